"""HFExportCallback: save the trained policy as a Hugging Face folder at the end of ``fit``."""

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

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        if trainer.is_global_zero:
            pl_module.save_hf(path)
            rank_zero_info(f"exported the policy as a Hugging Face folder: {path}")
