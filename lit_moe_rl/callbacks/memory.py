"""MemoryCallback: the process's resident memory (RSS) per training step, as ``perf/rss_mb``.

Resident memory should stay flat over a run: routes, rollouts and logged values are freed every step.
Reads ``/proc/self/statm`` (Linux); elsewhere it logs nothing.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def resident_mb() -> float | None:
    """Resident set size of this process in MiB (None where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryCallback(Callback):
    """Logs ``perf/rss_mb`` after every training step and keeps the history in :attr:`history`."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        rss = resident_mb()
        if rss is None:
            return
        self.history.append((trainer.global_step, rss))
        pl_module.log("perf/rss_mb", rss, on_step=True, on_epoch=False, batch_size=1)
