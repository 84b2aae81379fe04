"""The CLI's progress bar: Lightning's rich bar, counted the way an RL run is (``max_steps``, not epochs).

Lightning's bar, under ``max_steps``, reads ``Epoch 0/-2`` (``max_epochs`` is -1 then), shows the logger's
version as ``v_num: 0.000``, and counts batches against the optimizer steps left: a run with
``model.mini_batches: 4`` takes 4 optimizer steps per rollout, so its bar stopped at a quarter of its
length. :class:`RunProgressBar` says ``Training``, counts rollouts to the end of the run, and shows the
latest rollout's mean reward (``reward/mean``) beside the held-out ``val/reward``.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["RunProgressBar"]

SHOWN = {"reward/mean": "reward"}
"""Logged training metrics the bar shows, by the short name it gives them."""


class RunProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` for runs that end at ``trainer.max_steps``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "Training"

    @property
    def total_train_batches(self) -> int | float:
        """The batches left to ``max_steps``: a batch takes the module's ``optimizer_steps_per_batch``
        optimizer steps (1 where the module does not say)."""
        trainer = self.trainer
        if not (trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0):
            return trainer.num_training_batches
        per_batch = getattr(trainer.lightning_module, "optimizer_steps_per_batch", 1)
        remaining = math.ceil((trainer.max_steps - trainer.global_step) / per_batch)
        return min(trainer.num_training_batches, remaining)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The training reward first, then what the module logged with ``prog_bar=True``; no ``v_num``."""
        logged = trainer.callback_metrics
        shown = {short: float(logged[name]) for name, short in SHOWN.items() if name in logged}
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {**shown, **items}
