"""The run summary gives the log folder, skipped updates, failed reward calls and, for R3/RSPO, routing."""

from __future__ import annotations

import logging
import os

import torch

from tests.helpers import run_fit


def _summary(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "run summary" in r.getMessage())


def test_summary_of_an_r3_run_has_routing_numbers_and_the_log_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    metrics = run_fit(
        tmp_path,
        "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
        "--trainer.callbacks.mode=R3",
    )
    text = _summary(caplog)
    assert "skipped updates: 0" in text
    threads = torch.get_num_threads()
    compute = (
        f"compute: {threads} CPU thread(s), experts lit_grouped_mm, torch_compile off, shared prompts on, "
        "padding skipped on"
    )
    assert compute in text
    assert "failed reward calls: 0 of 32 (scored 0)" in text  # 8 validation at steps 0 and 2 + 2 steps x 8
    assert "routing/rollout_train_router_disagreement 0 " in text + " "  # replay happened: 0 by construction
    assert "mismatch/train_infer_kl" in text
    assert f"logs: {metrics.parent}" in text


def test_summary_counts_failed_reward_calls_and_has_no_routing_line_without_r3(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_fit(
        tmp_path,
        "--rollout.reward=tests.test_summary:fail_half",
        "--rollout.reward_isolation=thread",
        "--rollout.reward_workers=1",  # one thread: the call counter below is exact
    )
    text = _summary(caplog)
    assert "failed reward calls: 16 of 32 (scored 0)" in text
    assert "routing (run mean)" not in text
    assert "shared prompts on" in text


def test_summary_says_why_prompts_are_not_shared(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_fit(tmp_path, "--model.gradient_checkpointing=true")
    text = _summary(caplog)
    assert "shared prompts off (gradient checkpointing)" in text
    assert "padding skipped off (gradient checkpointing)" in text


def fail_half(completion: str, sample: dict) -> float:
    """Raises on every other call (odd-numbered calls)."""
    fail_half.calls = getattr(fail_half, "calls", 0) + 1
    if fail_half.calls % 2:
        raise RuntimeError("flaky verifier")
    return 1.0


def by_target(completion: str, sample: dict) -> float:
    """A reward of the prompt alone: every validation scores the same, and the two ranks' halves differ."""
    return (int(sample["target"]) % 4) / 3


def test_two_process_summary_is_the_whole_runs_not_rank_0s(tmp_path):
    """Issue 19.1: under 2 processes each rank validates and scores half; the summary's start, end and
    best held-out reward equal metrics.csv's (all ranks), and the reward calls are both ranks'."""
    import re
    import subprocess
    import sys

    from tests.helpers import ROOT, TINY_ARGS, latest_metrics, read_metrics
    from tests.test_distributed import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    args = [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *TINY_ARGS, "--trainer.devices=2", "--trainer.max_steps=2",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        '--model.config={"family": "qwen3_moe"}', "--model.lr=1e-3", "--data.batch_size=1",
        "--data.val_batch_size=2", "--trainer.val_check_interval=1", "--trainer.check_val_every_n_epoch=null",
        "--rollout.reward=tests.test_summary:by_target", "--rollout.reward_isolation=thread",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    rows = read_metrics(latest_metrics(tmp_path))
    val = [(int(r["step"]), float(r["val/reward"])) for r in rows if r.get("val/reward")]
    assert [step for step, _ in val] == [0, 1, 2]
    # Lightning's own rows (steps 1, 2) average both ranks; a reward of the prompt alone makes every
    # validation, the step-0 baseline the summary logs included, score that same value
    whole = f"{val[1][1]:.3f}"
    assert [f"{r:.3f}" for _, r in val] == [whole] * 3
    assert f"val/reward start: {whole} (step 0)" in out
    assert f"val/reward end:   {whole} (step 2)" in out
    assert f"val/reward best:  {whole} (step 0)" in out
    # per rank: 3 validations x 4 prompts + 2 steps x 1 prompt x 4 completions = 20; both ranks: 40
    assert re.search(r"failed reward calls: 0 of 40 \(scored 0\)", out), out[-2000:]


def test_last_checkpoint_holds_the_final_steps_validation(tmp_path):
    """A step's save runs before that step's validation: last.ckpt is saved again at the end of the run,
    so a resumed run's summary (and any reader of the checkpoint) has the final validation too."""
    import torch

    every_2 = (
        '[{"class_path": "lit_moe_rl.checkpoint.LastCheckpoint", "init_args": {"every_n_train_steps": 2}}]'
    )
    metrics = run_fit(tmp_path, "--trainer.val_check_interval=2", f"--trainer.callbacks={every_2}", steps=4)
    ckpt = torch.load(metrics.parent / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("RunSummary")]
    assert [step for step, _ in state["history"]] == [0, 2, 4]


def test_resumed_summary_says_which_figures_are_since_resuming(tmp_path, caplog):
    """Steps and the held-out rewards come from the checkpoint; wall time and reward calls are the session's."""
    r3 = ["--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback"]
    run_fit(tmp_path, "--trainer.limit_val_batches=0", *r3, steps=2)
    caplog.set_level(logging.INFO)
    run_fit(tmp_path, "--trainer.limit_val_batches=0", *r3, "--ckpt_path=last", steps=5)
    text = _summary(caplog)
    assert "routing (mean since resuming): " in text
    assert "optimizer steps: 5 (3 after resuming at step 2)   wall time: " in text
    assert " s since resuming" in text
    assert "failed reward calls: 0 of 24 since resuming (scored 0)" in text  # 3 steps x 8 completions


def test_the_last_step_is_validated_when_the_interval_misses_it(tmp_path):
    """3 steps, validation once an epoch (32 batches): the sanity check at step 0, then the last step, as verl
    validates; ``--summary.validate_at_end=false`` leaves Lightning's schedule (step 0 only)."""
    import csv

    def validated(root, *extra: str) -> list[int]:
        with open(run_fit(root, *extra, steps=3)) as f:
            return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("val/reward")]

    assert validated(tmp_path / "end") == [0, 3]
    assert validated(tmp_path / "off", "--summary.validate_at_end=false") == [0]
    assert validated(tmp_path / "lands", "--trainer.val_check_interval=3") == [0, 3]  # once, not twice
