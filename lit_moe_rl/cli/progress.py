"""The CLI's progress bar: Lightning's rich bar, counted the way an RL run is (``max_steps``, not epochs).

Lightning's bar, under ``max_steps``, reads ``Epoch 0/-2`` (``max_epochs`` is -1 then), shows the logger's
version as ``v_num: 0.000``, and counts batches against the optimizer steps left: a run with
``model.mini_batches: 4`` takes 4 optimizer steps per rollout, so its bar stopped at a quarter of its
length, and a run resumed in the middle of an epoch (whose batch count goes on from the checkpoint's)
ran past its end. :class:`RunProgressBar` counts the epoch's batches to the end of the run, says
``Training`` (with the epoch while the run goes on past it), and shows the latest rollout's mean reward
(``reward/mean``) beside the held-out ``val/reward``. Runs bounded by ``max_epochs`` keep Lightning's count.
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._latest: dict[str, Any] = {}  # every metric shown so far, at its latest value

    def _by_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0

    def _batches_to_the_end(self) -> int:
        """This epoch's batch count when the run reaches ``max_steps``: the batches it has run (a resumed
        run goes on counting from the checkpoint's) and those the optimizer steps left take. A batch is
        the module's ``optimizer_steps_per_batch`` steps under manual optimisation (1 where it does not
        say), and ``1 / accumulate_grad_batches`` of a step under Lightning's automatic optimisation, where
        the batches of an unfinished accumulation already count toward the next step."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # a new epoch's start: Lightning resets the count later
            done = 0
        steps_left = trainer.max_steps - trainer.global_step
        module = trainer.lightning_module
        if module.automatic_optimization:
            accumulate = trainer.accumulate_grad_batches
            return done + steps_left * accumulate - done % accumulate
        return done + math.ceil(steps_left / getattr(module, "optimizer_steps_per_batch", 1))

    @property
    def total_train_batches(self) -> int | float:
        if not self._by_steps():
            return super().total_train_batches
        return min(self.trainer.num_training_batches, self._batches_to_the_end())

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        # the epoch only while the run goes on past it: a run resumed after a max_steps stop is in
        # Lightning's next epoch, though its data goes on (README "Many processes, resume, LoRA")
        last_epoch = self._batches_to_the_end() <= self.trainer.num_training_batches
        text = "Training" if last_epoch else f"Training (epoch {current_epoch})"
        return f"{text:{len(self.validation_description)}}"  # as Lightning pads: no flicker between bars

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The training reward first, then what the module logged with ``prog_bar=True``, each at its latest
        value (Lightning drops the sanity check's ``val/reward``, the baseline, until the next validation);
        no ``v_num``."""
        logged = trainer.callback_metrics
        shown = {short: float(logged[name]) for name, short in SHOWN.items() if name in logged}
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        self._latest = {**self._latest, **shown, **items}
        return {**{k: self._latest[k] for k in SHOWN.values() if k in self._latest}, **self._latest}
