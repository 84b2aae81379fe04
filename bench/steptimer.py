"""A Lightning callback that records, per optimizer step, when it ended and what it sampled, plus the
peak memory of the steps; the benchmarks read its JSON. Used as ``--trainer.callbacks=bench.steptimer.StepTimer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
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


def timed_fit_command(
    steps: int, timings: Path, *, prompts: Path, batch_size: int, group_size: int, max_new_tokens: int
) -> list[str]:
    """``lit-moe-rl fit`` (this interpreter, so the checkout's code) on a prompt file, timed by
    :class:`StepTimer` into ``timings``: no validation, checkpoints or progress bar, the whole rollout in one
    forward, the digit reward. The caller adds the model and logger settings."""
    return [
        sys.executable, "-m", "lit_moe_rl.cli", "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=bench.steptimer.StepTimer",
        f"--trainer.callbacks.path={timings}",
        f"--model.micro_batch_size={batch_size * group_size}",
        "--data.source=file",
        f"--data.path={prompts}",
        "--data.num_val=0",
        f"--data.batch_size={batch_size}",
        f"--rollout.group_size={group_size}",
        "--rollout.reward=bench.vs_trl:digit_reward",
        "--rollout.engine=lit_moe_rl.rollout.engine.HFEngine",
        f"--rollout.engine.max_new_tokens={max_new_tokens}",
    ]  # fmt: skip


def bench_env(threads: int) -> dict[str, str]:
    """The environment of a timed subprocess: ``threads`` intra-op threads, this checkout first on the
    path, offline Hugging Face, no W&B."""
    root = str(Path(__file__).resolve().parents[1])
    return os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
    }


def run_timed(command: list[str], work: Path, out: Path, threads: int, what: str) -> dict:
    """Run a :class:`StepTimer`-timed subprocess in ``work`` and return its JSON report (``out``), with
    ``step_s``: the seconds between consecutive step ends. Exits naming ``what`` when it fails."""
    proc = subprocess.run(command, cwd=work, env=bench_env(threads), capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    ends = result["ends"]
    return result | {"step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)]}
