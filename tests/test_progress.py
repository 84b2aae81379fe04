"""The CLI's progress bar (lit_moe_rl/cli/progress.py): rollouts to max_steps, the training reward, no epoch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lit_moe_rl.cli.progress import RunProgressBar
from tests.helpers import run_fit

RL = SimpleNamespace(automatic_optimization=False, optimizer_steps_per_batch=4)


def bar_on(done: int = 0, **trainer) -> RunProgressBar:
    """The bar on a trainer whose current epoch has run ``done`` batches."""
    bar = RunProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(processed=done))
    defaults = dict(
        max_epochs=-1,
        max_steps=10,
        global_step=0,
        accumulate_grad_batches=1,
        num_training_batches=math.inf,
        lightning_module=RL,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        callback_metrics={},
        progress_bar_metrics={},
        loggers=[],
    )
    bar._trainer = SimpleNamespace(**{**defaults, **trainer})
    return bar


@pytest.mark.parametrize(
    ("done", "trainer", "total"),
    [
        (0, {}, 3),  # 10 steps at 4 per rollout: rollouts 1-3 reach step 12 >= 10
        (1, {"global_step": 4}, 3),  # resumed after one rollout: it counts on from 1, 2 rollouts left
        (3, {"global_step": 12, "max_steps": 20, "num_training_batches": 3}, 2),  # epoch 2 starts: 3 is the
        # previous epoch's count, which Lightning resets only after the bar reads its total
        (2, {"global_step": 8}, 3),
        (0, {"num_training_batches": 2}, 2),  # the data ends first
        (0, {"lightning_module": SimpleNamespace(automatic_optimization=False)}, 10),  # one step a batch
        (3, {"lightning_module": SimpleNamespace(automatic_optimization=True), "accumulate_grad_batches": 2,
             "global_step": 1}, 20),  # SFT: 2 batches a step; the 3rd batch ended, the 2nd step not yet
        (4, {"lightning_module": SimpleNamespace(automatic_optimization=True), "accumulate_grad_batches": 2,
             "global_step": 2}, 20),
        (0, {"max_epochs": 3, "max_steps": -1, "num_training_batches": 7}, 7),  # epochs: Lightning's count
    ],
)  # fmt: skip
def test_total_counts_this_epochs_batches_to_max_steps(done, trainer, total):
    assert bar_on(done, **trainer).total_train_batches == total


def test_description_names_the_epoch_only_while_the_run_goes_on_past_it():
    assert bar_on()._get_train_description(0).rstrip() == "Training"
    assert bar_on(num_training_batches=2)._get_train_description(0).rstrip() == "Training (epoch 0)"
    assert bar_on(global_step=8)._get_train_description(1).rstrip() == "Training"  # it ends in epoch 1
    assert bar_on(max_epochs=3, max_steps=-1)._get_train_description(1).rstrip() == "Epoch 1/2"  # Lightning's


def test_metrics_show_the_training_reward_first_and_no_version():
    bar = bar_on(
        callback_metrics={"reward/mean": torch.tensor(0.25), "policy/loss": torch.tensor(1.0)},
        progress_bar_metrics={"val/reward": 0.5},
        loggers=[SimpleNamespace(version=3)],
    )
    assert bar.get_metrics(bar.trainer, None) == {"reward": 0.25, "val/reward": 0.5}
    bar.trainer.progress_bar_metrics = {}  # Lightning dropped the sanity check's val/reward
    bar.trainer.callback_metrics = {"reward/mean": torch.tensor(0.5)}
    assert bar.get_metrics(bar.trainer, None) == {"reward": 0.5, "val/reward": 0.5}  # the baseline stays


def _bar_line(capsys) -> str:
    bar = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Training")]
    assert bar, "no progress bar printed"
    return bar[-1]


def test_cli_bar_ends_at_max_steps_with_mini_batches_and_after_a_resume(tmp_path, capsys):
    """4 optimizer steps at 2 mini-batches a rollout: the bar reads 2/2 at the end, not 2/4 or ``Epoch 0/-2``;
    resumed to 8 steps in the same epoch, it counts on from the checkpoint's 2 rollouts to 4/4 (not 4/2)."""
    bar = ["--trainer.enable_progress_bar=true", "--model.mini_batches=2", "--trainer.limit_val_batches=0"]
    run_fit(tmp_path, *bar, steps=4)
    line = _bar_line(capsys)
    assert " 2/2 " in line and "reward: " in line
    assert "Epoch" not in line and "v_num" not in line and "(epoch" not in line
    run_fit(tmp_path, *bar, "--ckpt_path=last", steps=8)
    assert " 4/4 " in _bar_line(capsys)


def test_cli_bar_over_two_epochs_ends_at_max_steps(tmp_path, capsys):
    """3 rollouts an epoch (6 prompts, 2 a step), 10 steps at 2 a rollout: epoch 1 holds rollouts 4-5, 2/2."""
    bar = ["--trainer.enable_progress_bar=true", "--model.mini_batches=2", "--trainer.limit_val_batches=0"]
    run_fit(tmp_path, *bar, "--data.num_train=6", steps=10)
    line = _bar_line(capsys)
    assert line.startswith("Training ") and "(epoch" not in line and " 2/2 " in line, line
