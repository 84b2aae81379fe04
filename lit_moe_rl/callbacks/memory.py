"""MemoryCallback: memory per training step, ``perf/rss_mb`` and, on CUDA, ``perf/peak_mem_gib``.

Resident memory should stay flat over a run: routes, rollouts and logged values are freed every step.
RSS is read from ``/proc/self/statm`` (Linux; elsewhere it is not logged). On CUDA the caching
allocator's peak of the step (reset when the step starts: rollout and update together) is the number to
compare with the device's memory.
"""

from __future__ import annotations

import os

import lightning as L
import torch
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
    """Logs ``perf/rss_mb`` (and ``perf/peak_mem_gib`` on CUDA) after every training step; keeps the RSS
    history in :attr:`history`."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("perf/peak_mem_gib", peak, on_step=True, on_epoch=False, batch_size=1)
        rss = resident_mb()
        if rss is None:
            return
        self.history.append((trainer.global_step, rss))
        pl_module.log("perf/rss_mb", rss, on_step=True, on_epoch=False, batch_size=1)
