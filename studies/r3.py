"""Study R3 (Ma et al., arXiv 2510.11370 §3, §5) at toy scale: the train/inference mismatch with and
without rollout routing replay, on a model whose router was trained.

    python studies/r3.py            # full: 2 arms x 3 seeds x 400 steps (about 25 min on 2 cores)
    python studies/r3.py --quick    # 2 arms x 1 seed x 8 steps, into a temporary folder (< 1 min)

The built-in warm start (``builtin:countdown-tiny-moe``) samples through a bf16 engine copy while the
trainer runs fp32 (``studies/configs/r3.yaml`` over ``configs/quickstart.yaml``); the arms differ only
in ``RoutingReplayCallback.mode``: ``off`` records the engine's routes and replays nothing, ``R3``
replays them in the π_old pass and every update. Per step it reads the trainer's own metrics:
``mismatch/train_infer_kl`` (π_old vs μ, R3 Eq. 2), ``mismatch/extreme_frac_tau*`` (Eq. 3), the
rollout-vs-training routing disagreement (router- and token-level), and the held-out reward. Then the
§3.3 observation: the KL between two training forwards of the same sequences in different batch
compositions (:func:`lit_moe_rl.nondeterminism.composition_kl`). Writes ``docs/results.md``'s R3 section
and ``docs/img/r3_*.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner import (
    RESULTS,
    ROOT,
    Run,
    across_seeds,
    by_variant,
    machine,
    plot_panels,
    run_grid,
    table,
    write_section,
)  # noqa: E402

ARMS = {"r3_off": "off", "r3_on": "R3"}
PANELS = [
    ("mismatch/train_infer_kl", "train-inference KL (π_old vs μ)"),
    ("mismatch/extreme_frac_tau2", "F(τ=2): tokens with ratio beyond 2x"),
    ("routing/rollout_train_router_disagreement", "router-level disagreement"),
    ("routing/rollout_train_token_disagreement", "token-level disagreement"),
    ("val/reward", "held-out greedy reward"),
    ("policy/entropy", "policy entropy"),
]
TAUS = ("1.5", "2", "5", "10")


def grid(quick: bool, seeds: int) -> list[Run]:
    base = ("--config=configs/quickstart.yaml", "--config=studies/configs/r3.yaml")
    extra = ("--trainer.max_steps=8", "--trainer.val_check_interval=4", "--data.num_val=16") if quick else ()
    return [
        Run(arm, seed, (*base, f"--trainer.callbacks.mode={mode}", *extra))
        for seed in range(seeds)
        for arm, mode in ARMS.items()
    ]


def summary_rows(grouped: dict[str, list[list[dict[str, float]]]]) -> list[list[object]]:
    """Per arm: each metric's mean over steps and seeds; the held-out reward at start, best and end."""
    rows = []
    for arm, runs in grouped.items():
        row: list[object] = [arm, len(runs)]
        for key in ["mismatch/train_infer_kl", *(f"mismatch/extreme_frac_tau{t}" for t in TAUS),
                    "routing/rollout_train_router_disagreement", "routing/rollout_train_token_disagreement"]:  # fmt: skip
            _, mean, _, _ = across_seeds(runs, key)
            row.append(statistics.fmean(mean) if mean else float("nan"))
        _, reward, _, _ = across_seeds(runs, "val/reward")
        row += [reward[0], max(reward), reward[-1]] if reward else [float("nan")] * 3
        rows.append(row)
    return rows


HEADER = ["arm", "seeds", "KL", *(f"F(τ={t})" for t in TAUS), "router disagr.", "token disagr.",
          "val start", "val best", "val end"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run into a temporary folder")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--out", type=Path, default=None, help="folder of results.md and img/ (default: docs/)")
    args = p.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    out = args.out or (Path(tempfile.mkdtemp(prefix="r3_study_")) if args.quick else RESULTS.parent)
    runs = grid(args.quick, seeds)
    results = run_grid(runs, out / "runs" if args.quick else ROOT / "runs" / "studies" / "r3", jobs=args.jobs)
    grouped = by_variant(results, runs)
    plot_panels(grouped, PANELS, out / "img" / "r3_mismatch.png", window=10)
    rows = summary_rows(grouped)
    kl = {row[0]: row[2] for row in rows}
    command = "python studies/r3.py" + (" --quick" if args.quick else "")
    text = "\n\n".join([
        "## R3: train-inference mismatch with and without routing replay",
        f"`{command}` on {machine()}; {seeds} seed(s) per arm; means over steps and seeds.",
        table(HEADER, rows),
        f"KL without / with R3: **{kl['r3_off'] / kl['r3_on']:.2f}x**.",
        "![R3 study](img/r3_mismatch.png)",
    ])  # fmt: skip
    write_section(out / RESULTS.name, "r3", text)
    print(text)


if __name__ == "__main__":
    main()
