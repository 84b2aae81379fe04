"""SampleTableCallback: a table of sampled completions with their rewards, every N steps.

With a :class:`~lightning.pytorch.loggers.WandbLogger` the rows go to a W&B table (``samples``);
with any logger they are also appended to ``<log_dir>/samples.jsonl`` so a CSV-logged run keeps them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

COLUMNS = ["step", "prompt", "completion", "reward", "advantage"]


class SampleTableCallback(Callback):
    """Logs ``num_samples`` completions of the current rollout every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int = 10, num_samples: int = 8) -> None:
        """
        Args:
            every_n_steps: Steps between two tables.
            num_samples: Completions per table (the first ones of the rollout: whole groups).
        """
        if every_n_steps < 1:
            raise ValueError(f"samples.every_n_steps: must be >= 1, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"samples.num_samples: must be >= 1, got {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        rollout = batch.get("rollout")
        step = trainer.global_step
        if (
            rollout is None
            or not rollout.texts
            or batch_idx % self.every_n_steps
            or not trainer.is_global_zero
        ):
            return
        rows = table_rows(rollout, step, self.num_samples)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("samples", columns=COLUMNS, data=rows, step=step)
        if trainer.log_dir:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, "samples.jsonl"), "a") as f:
                for row in rows:
                    f.write(json.dumps(dict(zip(COLUMNS, row, strict=True))) + "\n")


def table_rows(rollout: Any, step: int, num_samples: int) -> list[list[Any]]:
    """``[step, prompt, completion, reward, advantage]`` for the first ``num_samples`` sequences."""
    n = min(num_samples, rollout.num_sequences)
    prompts = rollout.prompts or [""] * n
    advantages = rollout.advantages.reshape(rollout.num_sequences, -1)[:, 0]
    return [
        [step, prompts[i], rollout.texts[i], float(rollout.rewards[i]), float(advantages[i])]
        for i in range(n)
    ]
