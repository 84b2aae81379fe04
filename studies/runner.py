"""Shared machinery of the studies: run a grid of ``lit-moe-rl fit`` configs over seeds, read their
metrics, aggregate over seeds, plot, and write a section of ``docs/results.md``.

Each run is a subprocess of the real CLI (one torch thread each, ``--jobs`` at a time), logging to
``<out>/runs/<name>/version_0/metrics.csv``; nothing here knows about a particular study.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"

Rows = list[dict[str, float]]


@dataclass(frozen=True)
class Run:
    """One ``lit-moe-rl fit``: ``variant`` names the arm of the study, ``seed`` its repetition."""

    variant: str
    seed: int
    args: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"


def run_grid(runs: Sequence[Run], out: Path, *, jobs: int = 2, timeout_s: float = 3600) -> dict[str, Rows]:
    """Run every ``Run`` (``jobs`` at a time), logging under ``out/<run.name>/``; ``{run.name: rows}``."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda run: (run.name, _fit(run, out, timeout_s)), runs))
    return dict(results)


def _fit(run: Run, out: Path, timeout_s: float) -> Rows:
    """Run ``run`` once: a finished run whose ``done.json`` records the same command is read, not rerun
    (a study can be extended or its page rewritten without redoing its runs)."""
    metrics, done = out / run.name / "version_0" / "metrics.csv", out / run.name / "done.json"
    cmd = _command(run, out)
    record = {"cmd": cmd[1:], "configs": _config_digests(run.args)}
    if done.is_file() and metrics.is_file() and _same_run(json.loads(done.read_text()), record):
        return read_metrics(metrics)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{run.name}: lit-moe-rl fit exited {proc.returncode}: {tail[0]}")
    seconds = time.perf_counter() - t0
    print(f"  {run.name}: {seconds:.0f} s", flush=True)
    done.write_text(json.dumps({**record, "seconds": round(seconds, 1)}))
    return read_metrics(metrics)


def _same_run(done: dict, record: dict) -> bool:
    return all(done.get(key) == value for key, value in record.items())


def _config_digests(args: Sequence[str]) -> dict[str, str]:
    """sha256 of every ``--config=`` file: an edited config reruns the runs that read it."""
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:16] for f in files}


def _command(run: Run, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *run.args,
        f"--seed_everything={run.seed}",
        f"--rollout.seed={run.seed}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={run.name}",
        "--trainer.logger.init_args.version=0",
    ]  # fmt: skip


def read_metrics(path: Path) -> Rows:
    """The rows of a Lightning ``CSVLogger`` file, numbers only (empty cells dropped), each with a
    ``rollouts`` count: how many rollouts had been trained on when the row was logged.

    Every row's ``step`` is the optimizer step count after it (README "Metrics"; the pre-training
    baseline is step 0), and each rollout takes ``model.mini_batches`` optimizer steps (read from the
    ``config.yaml`` beside the file), so ``rollouts = step / mini_batches``.
    """
    with path.open() as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    mini_batches = _mini_batches(path.parent / "config.yaml")
    for row in rows:
        row["rollouts"] = row["step"] / mini_batches
    return rows


def _mini_batches(config: Path) -> int:
    if not config.is_file():
        return 1
    import yaml

    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return int(model.get("mini_batches") or 1)


def series(rows: Rows, key: str) -> dict[int, float]:
    """``{rollouts: value}`` of one metric (the last value logged after that many rollouts)."""
    return {int(r["rollouts"]): r[key] for r in rows if key in r and not math.isnan(r[key])}


def across_seeds(runs: Iterable[Rows], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, mean, min, max)`` of ``key`` over the seeds, at the steps every seed logged."""
    per_seed = [series(rows, key) for rows in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    values = [[s[step] for s in per_seed] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def by_variant(results: dict[str, Rows], runs: Sequence[Run]) -> dict[str, list[Rows]]:
    grouped: dict[str, list[Rows]] = {}
    for run in runs:
        grouped.setdefault(run.variant, []).append(results[run.name])
    return grouped


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_panels(
    grouped: dict[str, list[Rows]], panels: Sequence[tuple[str, str]], path: Path, *, window: int = 1
) -> None:
    """One panel per ``(metric, title)``: each variant's mean over seeds, shaded between min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for i, (variant, runs) in enumerate(grouped.items()):  # a variant keeps its colour in every panel
            steps, mean, lo, hi = across_seeds(runs, key)
            if not steps:
                continue
            w = 1 if key.startswith("val/") else window
            ax.plot(steps, smooth(mean, w), label=variant, color=f"C{i}")
            ax.fill_between(steps, smooth(lo, w), smooth(hi, w), alpha=0.2, color=f"C{i}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollouts")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats printed with 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """The machine, torch and the date the section is written (finished runs are read back, not rerun)."""
    import datetime

    import torch

    today = datetime.date.today().isoformat()
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, written {today}"


def write_section(path: Path, study: str, text: str) -> None:
    """Replace the text between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` (appended if absent)."""
    start, end = f"<!-- study:{study} -->", f"<!-- /study:{study} -->"
    page = path.read_text() if path.exists() else "# Results\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in page and end in page:
        before, rest = page.split(start, 1)
        page = before + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
