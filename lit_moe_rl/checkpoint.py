"""Crash-safe checkpoints: ``last.ckpt`` at every run's end, written to a temporary file and renamed.

:class:`LastCheckpoint` is the ``ModelCheckpoint`` the CLI registers. Over Lightning's own it:

- writes every checkpoint to ``.<name>.tmp`` beside the target and renames it into place (``os.replace``,
  atomic on POSIX), so a ``kill -9`` during a write leaves the previous checkpoint whole;
- saves ``last.ckpt`` when training ends at a step not yet saved (Lightning's ``save_last`` only saves
  at the end when no checkpoint was written during the run, so a run of 73 steps saving every 50 would
  leave step 50 as "last");
- lets ``--ckpt_path last`` find the newest ``last.ckpt`` of any earlier version of the same logger
  (a resumed run logs to a new ``version_N`` folder, where Lightning alone would look).

A sharded (``ModelParallelStrategy`` with ``save_distributed_checkpoint: true``) checkpoint is a folder: it
is written beside the target and swapped in by two renames (the old one removed last).
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic writes and a ``last.ckpt`` at the end of every run."""

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = 50,
        save_last: bool = True,
        save_top_k: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dirpath: Folder of the checkpoints (default: ``<log_dir>/checkpoints``).
            every_n_train_steps: Save every N optimizer steps (and at the end of the run).
            save_last: Keep ``last.ckpt`` pointing at the newest state.
            save_top_k: Keep this many step checkpoints besides ``last.ckpt`` (0: only ``last.ckpt``).
            kwargs: Further ``ModelCheckpoint`` arguments.
        """
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        tmp = target.with_name(f".{target.name}.tmp")
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank writes its part, then a barrier
        if trainer.is_global_zero:
            replace(tmp, target)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        logger = trainer.logger
        if self.dirpath is None and logger is not None and logger.save_dir is not None:
            pattern = os.path.join(logger.save_dir, str(logger.name or ""), "*", "checkpoints", "last*.ckpt")
            found |= set(glob.glob(pattern))
        return found


def replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``: one atomic rename for a file, two renames for a folder."""
    if tmp.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return
    os.replace(tmp, target)
