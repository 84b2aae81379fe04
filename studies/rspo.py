"""Study RSPO (Zhang et al., arXiv 2510.23027, the Countdown study) at toy scale: in an off-policy
regime where plain GRPO degrades and the router moves, do router-shift-weighted objectives stay stable?

    python studies/rspo.py            # full: 8 arms x 3 seeds x 200 rollouts (about 40 min on 2 cores)
    python studies/rspo.py --quick    # 8 arms x 1 seed x 2 rollouts, into a temporary folder
    python studies/rspo.py --search   # the regime search: GRPO over mini_batches x router_lr_scale, 1 seed

The policy is a fine-grained MoE (64 experts of width 32, top-8), warm-started once by the SFT recipe
``studies/configs/fine_moe_sft.yaml`` into ``runs/studies/fine_moe_warm`` (reused when present). Arms
(``studies/configs/rspo.yaml`` over ``configs/quickstart.yaml``, each algorithm with its own class's
defaults): GRPO, GSPO, GMPO, RSPO (GMPO + router shift), GRPO + router shift, GRPO + R3, RSPO + R3, and
RSPO with the per-layer shifts summed instead of averaged (an extra arm; the paper averages). Every arm
logs the router shift. Collapse: a seed collapses when its held-out reward falls below half of its best
and stays there to the end of the run (:func:`collapsed`). Writes ``docs/results.md``'s RSPO sections
and ``docs/img/rspo*.png``; each arm's resolved algorithm settings are read from its saved config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

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
SFT = ("--config=configs/quickstart_sft.yaml", "--config=studies/configs/fine_moe_sft.yaml")
WARM = ROOT / "runs" / "studies" / "fine_moe_warm"
R3 = json.dumps([{"class_path": "lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
                  "init_args": {"mode": "R3", "log_native_agreement": False}}])  # fmt: skip
ALGORITHMS = "lit_moe_rl.algorithms."
ARMS: dict[str, tuple[str, ...]] = {
    "GRPO": (),  # the overlay's GRPO, clip 0.2 / 0.2 (its class defaults)
    "GSPO": (f"--model.algorithm={ALGORITHMS}GSPO",),
    "GMPO": (f"--model.algorithm={ALGORITHMS}GMPO",),
    "RSPO": (f"--model.algorithm={ALGORITHMS}RSPO",),
    "GRPO+RS": ("--model.algorithm.router_shift=true",),
    "GRPO+R3": (f"--trainer.callbacks={R3}",),
    "RSPO+R3": (f"--model.algorithm={ALGORITHMS}RSPO", f"--trainer.callbacks={R3}"),
    "RSPO-sum": (f"--model.algorithm={ALGORITHMS}RSPO", "--model.algorithm.router_shift_layer_reduce=sum"),
}
PANELS = [
    ("val/reward", "held-out greedy reward"),
    ("policy/entropy", "policy entropy"),
    ("policy/clipfrac", "clip fraction"),
    ("rspo/gamma_mean", "γ̃ mean"),
    ("rspo/gamma_p10", "γ̃ 10th percentile"),
    ("rspo/floor_frac", "tokens at the γ̃ floor"),
    ("rspo/topk_changed_token_frac", "tokens whose top-K changed"),
    ("rspo/shift_mean", "router shift (mean |Δ log p|)"),
    ("policy/grad_norm", "gradient norm"),
]
SEARCH = [(mb, scale) for mb in (4, 8) for scale in (1.0, 4.0, 16.0)]
SEARCH_ROLLOUTS = 150
SEARCH_NOTE = (
    "Plain GRPO (clip 0.2 / 0.2) from the fine-grained warm start (64 experts of width 32, top-8; held-out "
    "reward 0.4375), lr 2e-4, 150 rollouts of 8 prompts x 8 completions, over the number of updates per "
    "rollout (`mini_batches`: the later ones off-policy) and the routers' own learning rate "
    "(`router_lr_scale`). The criterion for the study's regime: GRPO degrades, and γ̃ (the RSPO paper's mean "
    "over layers) has bite: median γ̃ <= ~0.95 and >= ~2% of tokens at the 0.8 floor. GRPO loses reward in "
    "every cell, but at 1x or 4x the router's rate γ̃ stays at 0.96-0.99 with no token at the floor, although "
    "the top-K set changes for 21-43% of tokens: the router's probabilities of the old experts move little "
    "even when the ranking among near-equal experts flips. 16x with 4 updates reaches γ̃ 0.95 but only 1% at "
    "the floor; only 16x with 8 updates per rollout meets both "
    "(γ̃ 0.90, 12% at the floor, GRPO 0.44 -> 0.21 at the end, 0.24 over the run): that cell is `studies/configs/rspo.yaml`."
)
SETTINGS = ("clip_low", "clip_high", "router_shift", "router_shift_floor", "router_shift_layer_reduce")


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


def settled_median(rows: Rows, key: str, after: int = 10) -> float:
    """Median of ``key`` over the rollouts after the first ``after`` (all of them in a short run)."""
    values = series(rows, key)
    late = [v for step, v in values.items() if step > after] or list(values.values())
    return statistics.median(late) if late else float("nan")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def arm_rows(grouped: dict[str, list[Rows]]) -> list[list[object]]:
    rows = []
    for arm, runs in grouped.items():
        val = [list(series(r, "val/reward").values()) or [float("nan")] for r in runs]
        best, final = [max(v) for v in val], [v[-1] for v in val]
        _, clip, _, _ = across_seeds(runs, "policy/clipfrac")
        rows.append([
            arm, f"{sum(collapsed(r) for r in runs)}/{len(runs)}",
            _mean([v[0] for v in val]), _mean(best), min(best), _mean(final), min(final),
            _mean([statistics.fmean(v[1:] or v) for v in val]),
            _mean([settled_median(r, "rspo/gamma_mean") for r in runs]),
            _mean([settled_median(r, "rspo/floor_frac") for r in runs]),
            _mean([settled_median(r, "rspo/topk_changed_token_frac") for r in runs]),
            _mean(clip),
        ])  # fmt: skip
    return rows


HEADER = ["arm", "collapsed", "val start", "best (mean)", "best (min)", "final (mean)", "final (min)",
          "run mean", "γ̃ mean", "floor share", "top-K changed", "clip frac"]  # fmt: skip


def resolved_settings(runs_dir: Path, runs: list[Run]) -> list[list[object]]:
    """Each arm's algorithm settings as its run saved them (``config.yaml``: what actually ran), read
    back through the algorithm class so that defaults and fixed choices (RSPO's router shift) show."""
    from lit_moe_rl import algorithms

    rows, seen = [], set()
    for run in runs:
        if run.variant in seen:
            continue
        seen.add(run.variant)
        config = yaml.safe_load((runs_dir / run.name / "version_0" / "config.yaml").read_text())
        model, spec = config["model"], config["model"]["algorithm"]
        name = spec["class_path"].rsplit(".", 1)[-1]
        algorithm = getattr(algorithms, name)(**(spec.get("init_args") or {}))
        replay = "RoutingReplayCallback" in json.dumps(config["trainer"].get("callbacks"))
        rows.append([run.variant, name, *(getattr(algorithm, k) for k in SETTINGS), model["lr"],
                     model.get("router_lr_scale", 1.0), model["mini_batches"], "R3" if replay else "-"])  # fmt: skip
    return rows


SETTINGS_HEADER = ["arm", "class", *SETTINGS, "lr", "router_lr_scale", "mini_batches", "replay"]


def warm_start(folder: Path, *, quick: bool) -> Path:
    """The fine-grained warm start: the SFT recipe run once into ``folder`` (reused when it is there)."""
    if (folder / "config.json").is_file():
        return folder
    cmd = [sys.executable, "-m", "lit_moe_rl.cli", "sft", *SFT, f"--model.export_dir={folder}",
           "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={folder.parent}"]  # fmt: skip
    if quick:
        cmd += ["--trainer.max_steps=10", "--trainer.val_check_interval=10", "--data.num_val=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"warm start: lit-moe-rl sft exited {proc.returncode}: {proc.stderr[-500:]}")
    return folder


def study_runs(args: argparse.Namespace, warm: Path) -> list[Run]:
    base = (*BASE, f"--model.pretrained={warm}")
    if args.search:
        return [Run(f"GRPO-mb{mb}-router{scale:g}x", 0, (*base, f"--model.mini_batches={mb}",
                    f"--model.micro_batch_size={64 // mb}", f"--model.router_lr_scale={scale}",
                    f"--trainer.max_steps={SEARCH_ROLLOUTS * mb}"))
                for mb, scale in SEARCH]  # fmt: skip
    quick = (
        ("--trainer.max_steps=16", "--trainer.val_check_interval=1", "--data.num_val=16")
        if args.quick
        else ()
    )
    seeds = 1 if args.quick else args.seeds
    return [Run(arm, seed, (*base, *extra, *quick)) for seed in range(seeds) for arm, extra in ARMS.items()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="a smoke run of every arm into a temporary folder")
    p.add_argument("--search", action="store_true", help="GRPO over mini_batches x router_lr_scale, 1 seed")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (the full study)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--out", type=Path, default=None, help="folder of results.md and img/ (default: docs/)")
    args = p.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="rspo_study_")) if args.quick else RESULTS.parent)
    name = "rspo_search" if args.search else "rspo"
    runs_dir = out / "runs" if args.quick else ROOT / "runs" / "studies" / name
    warm = warm_start(out / "runs" / "warm" if args.quick else WARM, quick=args.quick)
    runs = study_runs(args, warm)
    grouped = by_variant(run_grid(runs, runs_dir, jobs=args.jobs), runs)
    plot_panels(grouped, PANELS, out / "img" / f"{name}.png", window=5)
    command = "python studies/rspo.py" + (" --quick" if args.quick else " --search" if args.search else "")
    title = (
        "the regime search (GRPO only, seed 0)"
        if args.search
        else "stability off-policy, fine-grained routing"
    )
    text = "\n\n".join([
        f"## RSPO: {title}",
        *([SEARCH_NOTE] if args.search else []),
        f"`{command}` on {machine()}; collapse = the last three held-out evaluations all below half the run's "
        "best; run mean = the mean of a run's held-out evaluations after the start; γ̃ mean, floor share and top-K "
        "changed are medians over rollouts 11+ (each a mean over seeds).",
        table(HEADER, arm_rows(grouped)),
        "What each arm ran (its saved config.yaml, seed 0):",
        table(SETTINGS_HEADER, resolved_settings(runs_dir, runs)),
        f"![{name}](img/{name}.png)",
    ])  # fmt: skip
    write_section(out / RESULTS.name, name, text)
    print(text)


if __name__ == "__main__":
    main()
