"""A Lightning callback that records, per optimizer step, when it ended and what it sampled, plus the
peak memory of the steps; the benchmarks read its JSON. Used as ``--trainer.callbacks=bench.steptimer.StepTimer``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in KiB, from ``/proc/self/status`` (Linux); -1 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (``VmHWM``): Linux resets it on writing 5 to ``/proc/self/clear_refs``."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class StepTimer(Callback):
    """Writes ``{"ends", "lengths", "rss_start_kib", "peak_rss_kib"}`` to ``path`` at the end of training.

    ``ends``: ``time.perf_counter()`` at each optimizer-step end; ``lengths``: mean response tokens of each
    step's rollout; ``rss_start_kib``: resident memory when training starts (model loaded, nothing run);
    ``peak_rss_kib``: the highest resident memory from then on (CPU runs; the steps' peak is the difference).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.ends: list[float] = []
        self.lengths: list[float] = []
        self.rss_start = -1

    def on_train_start(self, trainer, pl_module) -> None:
        reset_peak_rss()
        self.rss_start = rss_kib("VmRSS")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        rollout = batch.get("rollout")
        if rollout is not None:
            self.lengths.append(float(rollout.response_mask.sum(-1).float().mean()))

    def on_train_end(self, trainer, pl_module) -> None:
        result = {
            "ends": self.ends,
            "lengths": self.lengths,
            "rss_start_kib": self.rss_start,
            "peak_rss_kib": rss_kib("VmHWM"),
        }
        Path(self.path).write_text(json.dumps(result))
