"""PeakMemoryMonitor: the step's peak memory as ``perf/peak_mem_gib``, so a run's memory is in its log."""

from __future__ import annotations

import resource
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class PeakMemoryMonitor(Callback):
    """Logs ``perf/peak_mem_gib`` after every training step (rollout and update together).

    On CUDA it is the caching allocator's peak of allocated tensors since the step began (reset at the
    start of each step), the number to compare with the device's memory. On CPU it is the process's peak
    resident set size since it started (the kernel cannot reset it), which only grows.
    """

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
        pl_module.log("perf/peak_mem_gib", peak_memory_gib(pl_module.device), batch_size=1)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the allocator's peak since its last reset; CPU: the process's peak RSS (``ru_maxrss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
