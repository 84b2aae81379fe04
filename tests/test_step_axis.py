"""One step axis everywhere (issue 19.8): every row of metrics.csv, the summary and the checkpoints count
optimizer steps (``trainer.global_step``), with ``mini_batches > 1``, across validation and a resume."""

from __future__ import annotations

import logging

import torch

from tests.helpers import read_metrics, run_fit

VAL_EVERY_ROLLOUT = ["--trainer.val_check_interval=1", "--trainer.check_val_every_n_epoch=null"]


def _steps(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


def test_rows_summary_and_checkpoint_count_optimizer_steps_with_two_mini_batches(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    extra = ["--model.mini_batches=2", "--data.num_train=6", *VAL_EVERY_ROLLOUT]
    keep_steps = [  # step checkpoints are named by the logged step: it must be the one they hold
        "--trainer.callbacks+=lit_moe_rl.checkpoint.LastCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.save_last=false",
    ]  # fmt: skip
    rows = read_metrics(run_fit(tmp_path, *extra, *keep_steps, steps=4))  # 2 rollouts x 2 optimizer steps
    assert _steps(rows, "policy/loss") == [2, 4]
    assert _steps(rows, "val/reward") == [0, 2, 4]  # Lightning's own axis wrote 1 for the last one
    summary = "\n".join(r.getMessage() for r in caplog.records if "run summary" in r.getMessage())
    assert "(step 4)   change:" in summary and "optimizer steps: 4" in summary
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    for step in (2, 4):
        (named,) = tmp_path.rglob(f"epoch=0-step={step}.ckpt")
        assert torch.load(named, map_location="cpu", weights_only=True)["global_step"] == step
    resumed = read_metrics(run_fit(tmp_path, *extra, "--ckpt_path=last", steps=8))
    assert _steps(resumed, "policy/loss") == [6, 8]
    assert _steps(resumed, "val/reward")[-2:] == [6, 8]


def zero(completion: str, sample: dict) -> float:
    return 0.0


def test_a_skipped_rollout_takes_as_many_optimizer_steps_as_an_update(tmp_path):
    """DAPO drops every group of a constant reward: the rollout is skipped, yet counts ``mini_batches``
    optimizer steps like an update (it counted one, so step and rollout drifted apart)."""
    rows = read_metrics(
        run_fit(
            tmp_path,
            "--model.mini_batches=2",
            "--model.algorithm=lit_moe_rl.algorithms.DAPO",
            "--rollout.reward=tests.test_step_axis:zero",
            "--trainer.limit_val_batches=0",
            steps=4,
        )  # fmt: skip
    )
    assert _steps(rows, "policy/skipped_steps") == [2, 4]
    assert [float(r["policy/skipped_steps"]) for r in rows if r.get("policy/skipped_steps")] == [1.0, 2.0]
