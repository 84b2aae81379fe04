"""The run's config saved beside its logs, and kept when a second run uses the same folder.

LightningCLI's ``SaveConfigCallback`` writes ``<log_dir>/config.yaml`` and stops the run (a 39-line
traceback) if the file exists: a second run with a fixed ``logger.version``, with W&B offline, or with
``trainer.logger=false`` (the log folder is then ``default_root_dir``) writes to the same folder.
:class:`VersionedConfig` versions the config with the run instead: an earlier ``config.yaml`` that
differs is kept as ``config.1.yaml`` (``.2``, ...), with one line saying so; an identical one is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


class VersionedConfig(SaveConfigCallback):
    """``SaveConfigCallback`` that never fails on an existing ``config.yaml``: it keeps it under a new name."""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # a broadcast: every rank calls it
            if trainer.is_global_zero and log_dir is not None:
                keep_earlier(
                    Path(log_dir) / self.config_filename, self.parser.dump(self.config, skip_none=False)
                )
            self.overwrite = True  # identical content, or moved away above
        super().setup(trainer, pl_module, stage)


def keep_earlier(path: Path, text: str) -> Path | None:
    """Rename an earlier ``path`` whose content differs from ``text`` to the first free ``<stem>.<n><suffix>``."""
    if not path.is_file() or path.read_text() == text:
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    rank_zero_info(
        f"lit-moe-rl: {path} held an earlier run's config: kept as {kept.name}; {path.name} is this run's"
    )
    return kept
