"""Exact, crash-safe resume: stopped after step k and resumed with ``--ckpt_path last``, a run logs what
an uninterrupted one logs, to the last digit, with the reference KL, R3, R2, RSPO and DAPO."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lit_moe_rl.data.sampler import ResumableSampler
from tests.helpers import ROOT, TINY_ARGS, train_rows

REF_KL = ["--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback"]
R3 = [
    "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
    "--trainer.callbacks.mode=R3",
]
R2 = [
    "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
    "--trainer.callbacks.mode=R2",
]
MODES = {
    "rspo_r3_refkl": [
        "--model.algorithm=lit_moe_rl.algorithms.RSPO", "--model.algorithm.kl_coef=0.05", *REF_KL, *R3,
        "--rollout.engine.dtype=bfloat16",
    ],
    "dapo_r2_refkl": [
        "--model.algorithm=lit_moe_rl.algorithms.DAPO", "--model.algorithm.kl_coef=0.05", *REF_KL, *R2,
        "--model.mini_batches=2",
    ],
}  # fmt: skip


def fit(root, *extra: str, steps: int) -> list[dict[str, float]]:
    from tests.helpers import run_fit

    return train_rows(
        run_fit(root, "--data.num_train=6", "--trainer.limit_val_batches=0", *extra, steps=steps)
    )


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_last_logs_what_an_uninterrupted_run_logs(tmp_path, mode):
    extra = MODES[
        mode
    ]  # the default seed (0): an explicit --seed_everything leaks into later in-process runs
    full = fit(tmp_path / "full", *extra, steps=8)
    fit(tmp_path / "part", *extra, steps=4)
    last = next((tmp_path / "part").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    resumed = fit(tmp_path / "part", *extra, "--ckpt_path=last", steps=8)
    tail = full[len(full) - len(resumed) :]
    assert len(resumed) == len(full) // 2 >= 2  # 3 steps per epoch: both runs cross epoch ends
    assert "ref/kl" in resumed[0] and resumed[0]["ref/kl"] > 0  # the reference is the initial policy
    for before, after in zip(tail, resumed, strict=True):
        for key, value in before.items():
            if key.startswith("perf/") or key == "epoch":
                continue
            assert after[key] == value, (key, after[key], value)  # bitwise


def test_kl_coef_zero_runs_no_reference_forward(tmp_path, monkeypatch):
    from lit_moe_rl.callbacks.reference_kl import ReferenceKLCallback

    calls = []
    original = ReferenceKLCallback.reference_logprobs
    monkeypatch.setattr(ReferenceKLCallback, "reference_logprobs", lambda *a: calls.append(1) or original(*a))
    rows = fit(tmp_path, *REF_KL, steps=2)
    assert calls == [] and "ref/kl" not in rows[0]
    rows = fit(tmp_path / "monitor", *REF_KL, "--trainer.callbacks.monitor=true", steps=2)
    assert calls and rows[0]["ref/kl"] == pytest.approx(0.0, abs=1e-7)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import lightning.fabric.utilities.cloud_io as cloud_io
import lightning.fabric.plugins.io.torch_io as torch_io
from lit_moe_rl.cli import main

saves = []
original = cloud_io._atomic_save

def dying_save(checkpoint, filepath):
    saves.append(filepath)
    if len(saves) == 2:  # the second checkpoint: write half of it, then die as kill -9 would
        import io, torch
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(filepath, "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original(checkpoint, filepath)

torch_io._atomic_save = dying_save
main(sys.argv[1:])
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    args = [
        "fit", *TINY_ARGS, "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", '--model.config={"family": "qwen3_moe"}',
        "--trainer.limit_val_batches=0", "--trainer.callbacks+=lit_moe_rl.checkpoint.LastCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args], env=env, capture_output=True, timeout=240
    )
    assert done.returncode == -9, done.stderr[-2000:]
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    assert list(tmp_path.rglob(".last.ckpt.tmp"))  # the torn write went to the temporary file only


# --------------------------------------------------------------- sampler state
def test_resume_after_a_max_steps_stop_follows_the_data_epoch_not_lightnings():
    """Lightning counts an epoch stopped by max_steps as finished and resumes at epoch + 1."""
    uninterrupted = ResumableSampler(6, seed=0)
    uninterrupted.set_epoch(0)
    epoch0 = list(uninterrupted)
    uninterrupted.set_epoch(1)
    epoch1 = list(uninterrupted)
    resumed = ResumableSampler(6, seed=0)
    resumed.resume_at(0, 4)
    resumed.set_epoch(1)  # Lightning's (ahead) number
    assert list(resumed) == epoch0[4:]
    resumed.set_epoch(2)
    assert list(resumed) == epoch1


def test_position_of_a_finished_epoch_is_the_start_of_the_next():
    sampler = ResumableSampler(6, seed=0)
    sampler.set_epoch(3)
    list(sampler)
    sampler.consumed = 4
    assert sampler.position() == (3, 4)
    sampler.consumed = 6
    assert sampler.position() == (4, 0)


def test_fsdp2_two_processes_resume_bitwise_with_r3_and_reference_kl(tmp_path):
    """Sharded checkpoint state, the full rollout copy re-synced after the restore, the sharded
    reference rebuilt from the initial weights: steps 3-4 of a resumed 2-process FSDP2 run equal the
    uninterrupted run's."""
    from tests.test_distributed_e2e import FSDP2, R3
    from tests.test_distributed_e2e import fit as fit_processes

    extra = [
        *FSDP2, *R3, "--model.algorithm=lit_moe_rl.algorithms.GRPO", "--model.algorithm.kl_coef=0.05",
        "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback", "--seed_everything=3",
    ]  # fmt: skip
    keep_step_2 = [  # a second checkpoint callback keeps the step-2 state of the uninterrupted run
        "--trainer.callbacks+=lit_moe_rl.checkpoint.LastCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.save_last=false",
    ]  # fmt: skip
    full, _ = fit_processes(tmp_path / "full", *extra, *keep_step_2, devices=2, batch_size=2, steps=4)
    (step_2,) = (tmp_path / "full").rglob("*step=2.ckpt")
    resumed, _ = fit_processes(
        tmp_path / "resumed", *extra, f"--ckpt_path={step_2}", devices=2, batch_size=2, steps=4
    )
    assert len(resumed) == 2 and resumed[0]["ref/kl"] > 0
    for before, after in zip(full[2:], resumed, strict=True):
        for key, value in before.items():
            if not key.startswith("perf/") and key != "epoch":
                assert after[key] == value, (key, after[key], value)
