"""The CLI's progress bar (lit_moe_rl/cli/progress.py): rollouts to max_steps, the training reward, no epoch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lit_moe_rl.cli.progress import RunProgressBar
from tests.helpers import run_fit


def bar_on(**trainer) -> RunProgressBar:
    bar = RunProgressBar()
    defaults = dict(
        max_epochs=-1,
        max_steps=10,
        global_step=0,
        num_training_batches=math.inf,
        lightning_module=SimpleNamespace(optimizer_steps_per_batch=4),
        callback_metrics={},
        progress_bar_metrics={},
        loggers=[],
    )
    bar._trainer = SimpleNamespace(**{**defaults, **trainer})
    return bar


@pytest.mark.parametrize(
    ("trainer", "total"),
    [
        ({}, 3),  # 10 steps at 4 per rollout: rollouts 1-3 reach step 12 >= 10
        ({"global_step": 4}, 2),  # resumed after one rollout: 6 steps left
        ({"global_step": 8}, 1),
        ({"num_training_batches": 2}, 2),  # the data ends first
        ({"lightning_module": SimpleNamespace()}, 10),  # a module that does not say: one step a batch
        ({"max_epochs": 3, "max_steps": -1, "num_training_batches": 7}, 7),  # epochs: Lightning's count
    ],
)
def test_total_counts_rollouts_to_max_steps(trainer, total):
    assert bar_on(**trainer).total_train_batches == total


def test_metrics_show_the_training_reward_first_and_no_version():
    bar = bar_on(
        callback_metrics={"reward/mean": torch.tensor(0.25), "policy/loss": torch.tensor(1.0)},
        progress_bar_metrics={"val/reward": 0.5},
        loggers=[SimpleNamespace(version=3)],
    )
    assert bar.get_metrics(bar.trainer, None) == {"reward": 0.25, "val/reward": 0.5}
    assert bar._get_train_description(0) == "Training"


def test_cli_bar_ends_at_max_steps_with_mini_batches(tmp_path, capsys):
    """4 optimizer steps at 2 mini-batches a rollout: the bar reads 2/2 at the end, not 2/4 or ``Epoch 0/-2``."""
    run_fit(tmp_path, "--trainer.enable_progress_bar=true", "--model.mini_batches=2", steps=4)
    bar = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Training")]
    assert bar, "no progress bar printed"
    assert " 2/2 " in bar[-1] and "reward: " in bar[-1]
    assert "Epoch" not in bar[-1] and "v_num" not in bar[-1]
