"""Quickstart step time by thread setting, on an idle machine and on one this bench loads itself.

    python bench/threads.py [--steps 30] [--repeats 2] [--settings one,all,passive,spin10k,auto,auto-spin]
    python bench/threads.py --quick      # 3 steps of one setting: checks that it all runs

Each run is ``lit-moe-rl fit --config configs/quickstart.yaml`` for ``--steps`` optimizer steps (no
validation, no checkpoints), timed by ``bench.steptimer.StepTimer``; the figures are the median and the mean seconds per
step over steps 2..N of all repeats (the mean shows the steps that collapse under load). The settings (``N`` = the cores this process may use):

* ``one``: 1 thread (``OMP_NUM_THREADS=1``);
* ``all``: N threads, OpenMP's default waiting (libgomp: spin ``GOMP_SPINCOUNT`` = 300,000 polls, then sleep);
* ``passive``: N threads, ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps at once);
* ``spin1k`` ... ``spin30k``: N threads, ``GOMP_SPINCOUNT`` = 1,000 ... 30,000 (a short spin, then
  sleep); with Intel's OpenMP (libiomp) instead: ``KMP_BLOCKTIME=0``, its equivalent;
* ``auto`` / ``auto-passive`` / ``auto-spin``: no ``OMP_NUM_THREADS``, ``--num_threads 0`` with the CLI's
  rule ``one-thread-small`` / ``all-cores-passive`` / ``all-cores-short-spin`` (``LIT_MOE_RL_AUTO_THREADS``):
  the mechanism itself, end to end (lit_moe_rl/cli/threads.py).

Conditions: ``idle`` (nothing started: run it on an otherwise idle machine, the load average is
printed) and ``loaded`` (the bench starts one busy-loop process per core for the run, then stops
them). Settings alternate within each repeat so that drifting load hits them alike. A run that exceeds
``--timeout`` seconds is stopped and shown as ``> timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.* and lit_moe_rl from this checkout

CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
from bench.steptimer import timed_trainer_args  # noqa: E402

RULE_VAR = "LIT_MOE_RL_AUTO_THREADS"  # lit_moe_rl.cli.threads.RULE_VAR (not imported: that loads torch)


def openmp_runtime() -> str:
    """``libgomp`` (GNU) or ``libiomp`` (Intel): the OpenMP library torch loaded (``/proc/<pid>/maps``)."""
    code = "import torch, pathlib; print(pathlib.Path('/proc/self/maps').read_text())"
    maps = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    return "libiomp" if "libiomp" in maps else "libgomp" if "libgomp" in maps else "unknown"


def settings(cores: int, runtime: str) -> dict[str, dict[str, str]]:
    """Each setting's environment (added to a clean one: :data:`CLEARED` removed)."""
    n = str(cores)

    def spin(count: int) -> dict[str, str]:  # libgomp polls GOMP_SPINCOUNT times; Intel's: KMP_BLOCKTIME ms
        return {"KMP_BLOCKTIME": "0"} if runtime == "libiomp" else {"GOMP_SPINCOUNT": str(count)}

    return {
        "one": {"OMP_NUM_THREADS": "1"},
        "all": {"OMP_NUM_THREADS": n},
        "passive": {"OMP_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE"},
        **{f"spin{k}k": {"OMP_NUM_THREADS": n, **spin(1000 * k)} for k in (1, 3, 10, 30)},
        "auto": {RULE_VAR: "one-thread-small"},
        "auto-passive": {RULE_VAR: "all-cores-passive"},
        "auto-spin": {RULE_VAR: "all-cores-short-spin"},
    }


def fit_command(steps: int, timings: Path, logs: Path) -> list[str]:
    """The quickstart's ``fit`` for ``steps`` steps, timed into ``timings``."""
    return [
        sys.executable, "-m", "lit_moe_rl.cli", "fit",
        f"--config={ROOT / 'configs' / 'quickstart.yaml'}",
        *timed_trainer_args(steps, timings),
        f"--trainer.logger.init_args.save_dir={logs}",
    ]  # fmt: skip


def run_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without thread settings, plus ``extra``; offline, this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in (*CLEARED, RULE_VAR)}
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    offline = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    return env | offline | {"PYTHONPATH": path} | extra


def time_run(extra: dict[str, str], steps: int, work: Path, timeout: float) -> list[float] | None:
    """Seconds per step (steps 2..N) of one quickstart run with ``extra`` env; None when it timed out."""
    out = work / f"timings-{time.monotonic_ns()}.json"
    command = fit_command(steps, out, work / "logs")
    try:
        done = subprocess.run(
            command, cwd=work, env=run_env(extra), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"quickstart run with {extra} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    ends = json.loads(out.read_text())["ends"]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes that spin on a core each, stopped (by their own ids) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them reach the run queue
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (median over 2..N)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting per condition")
    parser.add_argument(
        "--settings", default="one,all,passive,spin10k,auto,auto-spin", help="comma-separated"
    )
    parser.add_argument("--conditions", default="idle,loaded", help="comma-separated: idle, loaded")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is stopped")
    parser.add_argument(
        "--quick", action="store_true", help="3 steps, 1 repeat, setting 'one': checks that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.settings = 3, 1, "one"
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    known = settings(1, "libgomp")
    if not args.settings or any(s not in known for s in args.settings):
        parser.error(f"--settings: choose from {', '.join(known)}, got {','.join(args.settings) or '(none)'}")
    if not args.conditions or any(c not in ("idle", "loaded") for c in args.conditions):
        parser.error(f"--conditions: choose from idle, loaded, got {','.join(args.conditions) or '(none)'}")
    if args.steps < 2:
        parser.error(f"--steps: must be >= 2 (step 1 is dropped), got {args.steps}")
    return args


def measure(args: argparse.Namespace, table: dict[str, dict[str, str]], work: Path, cores: int) -> dict:
    """``{condition: {setting: [s/step...] or None (timed out)}}``."""
    results: dict[str, dict[str, list[float] | None]] = {}
    for condition in args.conditions:
        load = os.getloadavg()[0]
        note = (
            ""
            if condition == "loaded" or load < 0.5
            else " (NOT idle: other jobs run, the idle column is not idle)"
        )
        print(f"{condition}: load average {load:.2f} before starting{note}", flush=True)
        results[condition] = {s: [] for s in args.settings}
        with busy_loops(cores) if condition == "loaded" else contextlib.nullcontext():
            for repeat in range(args.repeats):
                for name in args.settings if repeat % 2 == 0 else args.settings[::-1]:
                    if results[condition][name] is None:
                        continue  # timed out once: not again
                    t0 = time.perf_counter()
                    steps = time_run(table[name], args.steps, work, args.timeout)
                    results[condition][name] = None if steps is None else results[condition][name] + steps
                    print(f"  {condition} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def cell(values: list[float] | None, timeout: float) -> str:
    """``median / mean`` s/step: the mean shows the steps that collapse, which the median hides."""
    if values is None:
        return f"> {timeout:.0f} s run"
    return f"{statistics.median(values):.3f} / {statistics.fmean(values):.3f}"


def report(results: dict, table: dict[str, dict[str, str]], args: argparse.Namespace) -> None:
    """One line per setting: its environment and median s/step per condition."""
    print(f"quickstart s/step (median / mean), over steps 2..{args.steps} of {args.repeats} run(s)")
    print("| setting | environment | " + " | ".join(f"{c} s/step" for c in args.conditions) + " |")
    print("|---|---|" + "---|" * len(args.conditions))
    for name in args.settings:
        env = " ".join(f"{k}={v}" for k, v in table[name].items())
        cells = " | ".join(cell(results[c][name], args.timeout) for c in args.conditions)
        print(f"| {name} | {env} | {cells} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    runtime = openmp_runtime()
    table = settings(cores, runtime)
    print(f"{cores} cores, OpenMP runtime of torch: {runtime}; loaded = {cores} busy-loop processes")
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp:
        results = measure(args, table, Path(tmp), cores)
    report(results, table, args)


if __name__ == "__main__":
    main()
