"""HFExportCallback: save the trained policy as a Hugging Face folder at the end of ``fit``.

A finished checkpoint is exported the same way: ``fit`` with the run's config, ``--ckpt_path`` of the
checkpoint and this callback. Lightning then restores the checkpoint and skips the training loop (its
``max_steps`` are done), so ``on_train_end`` never runs; ``on_fit_end`` exports instead (README "Export").
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class HFExportCallback(Callback):
    """Writes ``save_pretrained`` output (LoRA merged) that ``from_pretrained`` / ``model.pretrained`` load."""

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Target folder; default ``<log_dir>/hf_model``.
        """
        self.dirpath = dirpath
        self._exported = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exported = False

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module, "the policy")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run whose ``max_steps`` were already done trains nothing: export the restored policy."""
        if not self._exported and trainer.ckpt_path is not None:
            self._export(
                trainer, pl_module, f"the policy of {trainer.ckpt_path} (step {trainer.global_step})"
            )

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        path = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        if hasattr(pl_module, "gather_for_export"):
            pl_module.gather_for_export()  # every rank: a sharded policy without a full copy all-gathers
        if trainer.is_global_zero:
            pl_module.save_hf(path)
            rank_zero_info(f"exported {what} as a Hugging Face folder: {path}")
        self._exported = True
