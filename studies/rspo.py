"""Study RSPO (Zhang et al., arXiv 2510.23027, the Countdown study) at toy scale: in an off-policy
regime where plain GRPO degrades, do router-shift-weighted objectives stay stable?

    python studies/rspo.py            # full: 6 arms x 3 seeds x 300 rollouts (about 60 min on 2 cores)
    python studies/rspo.py --quick    # 6 arms x 1 seed x 3 rollouts, into a temporary folder
    python studies/rspo.py --search   # the regime search: GRPO over lr x mini_batches, 1 seed

Arms (``studies/configs/rspo.yaml`` over ``configs/quickstart.yaml``): GRPO, GSPO, GMPO, RSPO (GMPO +
router shift), GRPO + router shift, and GRPO + R3. Collapse: a seed collapses when its held-out reward
falls below half of its best and stays there to the end of the run (:func:`collapsed`). Writes
``docs/results.md``'s RSPO section and ``docs/img/rspo_*.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner import (  # noqa: E402
    RESULTS,
    ROOT,
    Rows,
    Run,
    across_seeds,
    by_variant,
    machine,
    plot_panels,
    run_grid,
    series,
    table,
    write_section,
)

BASE = ("--config=configs/quickstart.yaml", "--config=studies/configs/rspo.yaml")
R3 = json.dumps([{"class_path": "lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
                  "init_args": {"mode": "R3", "log_native_agreement": False}}])  # fmt: skip
ALGORITHMS = "lit_moe_rl.algorithms."
ARMS: dict[str, tuple[str, ...]] = {
    "GRPO": (),  # the quickstart's GRPO, clip 0.2 / 0.28
    "GSPO": (f"--model.algorithm={ALGORITHMS}GSPO",),
    "GMPO": (f"--model.algorithm={ALGORITHMS}GMPO",),
    "RSPO": (f"--model.algorithm={ALGORITHMS}RSPO",),
    "GRPO+RS": ("--model.algorithm.router_shift=true",),
    "GRPO+R3": (f"--trainer.callbacks={R3}",),
}
PANELS = [
    ("val/reward", "held-out greedy reward"),
    ("policy/entropy", "policy entropy"),
    ("policy/clipfrac", "clip fraction"),
    ("rspo/gamma_mean", "RSPO γ̃ mean"),
    ("rspo/floor_frac", "tokens at the γ floor"),
    ("policy/grad_norm", "gradient norm"),
]
SEARCH = [(lr, mb) for lr in ("1.0e-4", "2.0e-4", "4.0e-4") for mb in (2, 4)]


def collapsed(rows: Rows, last: int = 3) -> bool:
    """The collapse criterion: the last ``last`` held-out evaluations are all below half the run's best.

    "Falls below half its best and stays there": a dip that recovers is not a collapse, and neither
    is a single bad final evaluation.
    """
    rewards = list(series(rows, "val/reward").values())
    if len(rewards) <= last:
        return False
    best = max(rewards)
    return all(r < best / 2 for r in rewards[-last:])


def arm_rows(grouped: dict[str, list[Rows]]) -> list[list[object]]:
    rows = []
    for arm, runs in grouped.items():
        best = [max(series(r, "val/reward").values(), default=float("nan")) for r in runs]
        final = [list(series(r, "val/reward").values() or [float("nan")])[-1] for r in runs]
        start = [list(series(r, "val/reward").values() or [float("nan")])[0] for r in runs]
        entropy = [list(series(r, "policy/entropy").values() or [float("nan")])[-1] for r in runs]
        _, clip, _, _ = across_seeds(runs, "policy/clipfrac")
        _, gamma, _, _ = across_seeds(runs, "rspo/gamma_mean")
        rows.append([
            arm, f"{sum(collapsed(r) for r in runs)}/{len(runs)}",
            statistics.fmean(start), statistics.fmean(best), min(best), statistics.fmean(final), min(final),
            statistics.fmean(entropy), statistics.fmean(clip) if clip else float("nan"),
            statistics.fmean(gamma) if gamma else float("nan"),
        ])  # fmt: skip
    return rows


HEADER = ["arm", "collapsed", "val start", "best (mean)", "best (min)", "final (mean)", "final (min)",
          "final entropy", "clip frac", "γ̃ mean"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of every arm into a temporary folder")
    p.add_argument("--search", action="store_true", help="GRPO over the lr x mini_batches grid, 1 seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--out", type=Path, default=None, help="folder of results.md and img/ (default: docs/)")
    args = p.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="rspo_study_")) if args.quick else RESULTS.parent)
    runs_dir = (
        out / "runs" if args.quick else ROOT / "runs" / "studies" / ("rspo_search" if args.search else "rspo")
    )
    if args.search:
        runs = [Run(f"GRPO-lr{lr}-mb{mb}", 0, (*BASE, f"--model.lr={lr}", f"--model.mini_batches={mb}",
                    f"--model.micro_batch_size={64 // mb}", f"--trainer.max_steps={300 * mb}"))
                for lr, mb in SEARCH]  # fmt: skip
    else:
        seeds = 1 if args.quick else args.seeds
        quick = (
            ("--trainer.max_steps=12", "--trainer.val_check_interval=1", "--data.num_val=16")
            if args.quick
            else ()
        )
        runs = [
            Run(arm, seed, (*BASE, *extra, *quick)) for seed in range(seeds) for arm, extra in ARMS.items()
        ]
    grouped = by_variant(run_grid(runs, runs_dir, jobs=args.jobs), runs)
    name = "rspo_search" if args.search else "rspo"
    plot_panels(grouped, PANELS[:3] if args.search else PANELS, out / "img" / f"{name}.png", window=10)
    command = "python studies/rspo.py" + (" --quick" if args.quick else " --search" if args.search else "")
    text = "\n\n".join([
        "## RSPO: " + ("the regime search (GRPO only, seed 0)" if args.search else "stability off-policy"),
        f"`{command}` on {machine()}; collapse = the last three held-out evaluations all below half the run's best.",
        table(HEADER, arm_rows(grouped)),
        f"![{name}](img/{name}.png)",
    ])  # fmt: skip
    write_section(out / RESULTS.name, name, text)
    print(text)


if __name__ == "__main__":
    main()
