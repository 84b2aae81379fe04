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

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


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
    """Writes ``{"ends", "lengths", "rollout_s", "rss_start_kib", "peak_rss_kib"}`` to ``path`` at the end of
    training.

    ``ends``: ``time.perf_counter()`` at each optimizer-step end; ``lengths``: mean response tokens of each
    step's rollout; ``rollout_s``: each step's ``perf/rollout_s`` (sampling, reward, advantages); ``rss_start_kib``: resident memory when training starts (model loaded, nothing run);
    ``peak_rss_kib``: the highest resident memory from then on (CPU runs; the steps' peak is the difference).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.ends: list[float] = []
        self.lengths: list[float] = []
        self.rollout_s: list[float] = []
        self.rss_start = -1

    def on_train_start(self, trainer, pl_module) -> None:
        reset_peak_rss()
        self.rss_start = rss_kib("VmRSS")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        rollout = batch.get("rollout")
        if rollout is not None:
            self.lengths.append(float(rollout.response_mask.sum(-1).float().mean()))
            self.rollout_s.append(float(rollout.extras.get("perf/rollout_s", float("nan"))))

    def on_train_end(self, trainer, pl_module) -> None:
        result = {
            "ends": self.ends,
            "lengths": self.lengths,
            "rollout_s": self.rollout_s,
            "rss_start_kib": self.rss_start,
            "peak_rss_kib": rss_kib("VmHWM"),
        }
        Path(self.path).write_text(json.dumps(result))


def timed_trainer_args(steps: int, timings: Path) -> list[str]:
    """``steps`` optimizer steps timed by :class:`StepTimer` into ``timings``: no validation, checkpoints,
    progress bar or model summary."""
    return [
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=bench.steptimer.StepTimer",
        f"--trainer.callbacks.path={timings}",
    ]


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
        *timed_trainer_args(steps, timings),
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


def bench_env(threads: int | None) -> dict[str, str]:
    """The environment of a timed subprocess: ``threads`` intra-op threads (None: no ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS``, so each program's own default), this checkout first on the path, offline Hugging
    Face, no W&B."""
    root = str(Path(__file__).resolve().parents[1])
    counts = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    inherited = {k: v for k, v in os.environ.items() if threads is not None or k not in THREAD_VARS}
    return (
        inherited
        | counts
        | {
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled",
        }
    )


def run_timed(
    command: list[str],
    work: Path,
    out: Path,
    threads: int | None,
    what: str,
    env: dict[str, str] | None = None,
) -> dict:
    """Run a :class:`StepTimer`-timed subprocess in ``work`` (:func:`bench_env` plus ``env``) and return its
    JSON report (``out``), with ``step_s``: the seconds between consecutive step ends. Exits naming ``what``
    when it fails."""
    env = bench_env(threads) | (env or {})
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    ends = result["ends"]
    return result | {"step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)]}
