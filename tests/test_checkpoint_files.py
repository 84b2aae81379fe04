"""Checkpoint files (issue 18.11, 19.5): a folder swap cut by a crash between its two renames is recovered
before ``--ckpt_path last`` is resolved; a full disk removes the partial ``.last.ckpt.tmp`` and stops in
one line; the checkpoint snippet added to the CLI's default one is refused in one line."""

from __future__ import annotations

import errno
import os

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from lit_moe_rl import checkpoint
from lit_moe_rl.checkpoint import LastCheckpoint, recover, replace
from tests.helpers import ROOT, run_fit


def _folder_ckpt(path, content: str):
    path.mkdir(parents=True)
    (path / "shard_0.distcp").write_text(content)
    return path


def _crash_on_second_rename(monkeypatch):
    real, calls = os.replace, []

    def replace_once(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("crash between the renames")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_once)


def test_a_folder_swap_cut_between_its_renames_is_recovered(tmp_path, monkeypatch):
    target = _folder_ckpt(tmp_path / "last.ckpt", "step 1")
    tmp = _folder_ckpt(tmp_path / ".last.ckpt.tmp", "step 2")
    _crash_on_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        replace(tmp, target)
    assert not target.exists() and (tmp_path / ".last.ckpt.old").is_dir()  # the crash's leftovers
    monkeypatch.undo()
    recover(target)
    assert (target / "shard_0.distcp").read_text() == "step 2"  # the newer, complete one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_torn_tmp_without_old_is_not_taken_for_a_checkpoint(tmp_path):
    _folder_ckpt(tmp_path / ".last.ckpt.tmp", "half written")
    recover(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()


def test_ckpt_path_last_resumes_the_recovered_checkpoint_not_an_older_runs(tmp_path, monkeypatch):
    """Before the fix, run 1's crash left no last.ckpt and ``last`` silently resolved to run 0's."""
    logs = tmp_path / "runs" / "lightning_logs"
    older = _folder_ckpt(logs / "version_0" / "checkpoints" / "last.ckpt", "older run")
    os.utime(older, (1, 1))
    newer = _folder_ckpt(logs / "version_1" / "checkpoints" / "last.ckpt", "step 1")
    tmp = _folder_ckpt(logs / "version_1" / "checkpoints" / ".last.ckpt.tmp", "step 2")
    _crash_on_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        replace(tmp, newer)
    monkeypatch.undo()
    trainer = L.Trainer(
        logger=CSVLogger(tmp_path / "runs"), default_root_dir=tmp_path, enable_progress_bar=False
    )
    found = LastCheckpoint()._find_last_checkpoints(trainer)
    assert str(newer) in found and (newer / "shard_0.distcp").read_text() == "step 2"
    assert max(found, key=os.path.getmtime) == str(newer)


def test_a_full_disk_while_checkpointing_removes_the_partial_file_and_stops_in_one_line(
    tmp_path, monkeypatch, capsys
):
    def disk_full(checkpoint, filepath):  # writes part of the file, then the disk is full
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", disk_full)
    with pytest.raises(SystemExit) as stop:
        run_fit(tmp_path, "--trainer.limit_val_batches=0", steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1
    assert err[-1].startswith("lit-moe-rl: error: ") and err[-1].endswith(
        "last.ckpt: writing the checkpoint at step 1 failed (No space left on device); the partial "
        ".last.ckpt.tmp was removed and the previous last.ckpt is unchanged: free space in "
        f"{next(tmp_path.rglob('checkpoints'))} or point the checkpoint callback's dirpath elsewhere"
    )
    assert not list(tmp_path.rglob(".last.ckpt.tmp")) and not list(tmp_path.rglob("last.ckpt"))


def test_the_checkpoint_snippet_added_to_the_default_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_fit(tmp_path, f"--trainer.callbacks+={ROOT / 'callbacks' / 'checkpoint.yaml'}", steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert err[-1] == (
        "lit-moe-rl: error: trainer.callbacks: lit_moe_rl.checkpoint.LastCheckpoint is listed twice with the "
        "same settings (the CLI registers one by default: to change it, paste callbacks/checkpoint.yaml as an "
        "item of your config's trainer.callbacks list instead of adding it with --trainer.callbacks+=)"
    )


SHARDED = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=true",  # last.ckpt is a folder of per-rank shards
    "--trainer.callbacks=lit_moe_rl.checkpoint.LastCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",  # step 2's save swaps the folder of step 1
]


def test_a_sharded_run_resumes_from_a_folder_whose_swap_a_crash_cut_short(tmp_path):
    """2 processes (gloo), FSDP2, folder checkpoints: the swap at step 2 is cut between its renames (as a
    crash would leave it); ``--ckpt_path <folder>`` recovers it and resumes at step 2."""
    import shutil

    _fit_sharded(tmp_path / "run", steps=2)
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    assert (last / ".metadata").is_file()
    shutil.copytree(last, last.with_name(".last.ckpt.tmp"))  # the new one, complete and flushed
    os.replace(last, last.with_name(".last.ckpt.old"))  # the first rename; the crash comes before the second
    rows = _fit_sharded(tmp_path / "resumed", f"--ckpt_path={last}", steps=3)
    assert [r["step"] for r in rows if r.get("policy/loss")] == ["3"]  # resumed after step 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def _fit_sharded(root, *extra: str, steps: int) -> list[dict[str, str]]:
    import subprocess
    import sys

    from tests.helpers import TINY_ARGS, latest_metrics, read_metrics
    from tests.test_distributed import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    args = [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *TINY_ARGS, "--trainer.devices=2", f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        '--model.config={"family": "qwen3_moe"}', "--data.batch_size=1", "--trainer.limit_val_batches=0",
        *SHARDED, *extra,
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(latest_metrics(root))


def test_a_folder_that_is_not_a_sharded_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_fit(tmp_path, f"--ckpt_path={tmp_path}", steps=1)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lit-moe-rl: error: --ckpt_path {tmp_path}: a folder but not a sharded checkpoint (no .metadata)"
    )
