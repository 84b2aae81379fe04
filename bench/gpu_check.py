"""One command for a lent GPU: lit-moe-rl at real layer shapes, one line per check and a JSON report.

    python bench/gpu_check.py --wheels bench/wheels     # here (PyPI): fetch the wheels the GPU image lacks
    python bench/gpu_check.py --install bench/wheels --out $OUT     # on the GPU, carrying bench/wheels
    python bench/gpu_check.py --device cpu              # the same checks at toy size (CI runs it)

Every run prints first the command line for the GPU machine and the folder to carry. The GPU image has
torch, transformers, lightning, peft, ... but not jsonargparse or math-verify and no network:
``--install`` installs the carried pure-Python wheels offline (:mod:`gpu_wheels`). The whole check is
bounded by ``--budget`` seconds (8 minutes): each CLI run gets an equal share of what is left.

The model is a Qwen3-MoE with Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts, top-8,
moe_intermediate 768, 32 query / 4 KV heads of 128, vocabulary 151,936) but ``--layers`` layers and
random weights; ``--device cpu`` shrinks it to a toy. Checks, each printed as ``<name>: OK|FAIL ...``:

* ``env``: versions, the device, whether the installed transformers/torch are ones the project supports;
* ``experts``: the MoE expert kernels (transformers' ``eager``, ``batched_mm``, ``grouped_mm`` and the
  project's ``lit_grouped_mm``, ``model.experts_implementation``'s default) timed on one forward + backward
  of the update's shape; the fastest is reported, and the one training uses;
* ``rollout``: the project's engine against plain ``generate`` on the same prompts, both with the
  experts kernel training uses: tokens per second, and the engine's log-probs μ against the training
  forward's on the same tokens (fails when they disagree beyond the dtype's rounding);
* ``fit_*``: ``lit-moe-rl fit`` through the CLI for a few steps under ``precision: bf16-true``: GRPO,
  GRPO + R3, GMPO, RSPO and GRPO under FSDP2 (``ModelParallelStrategy``; Lightning's FSDP v1 is refused
  by the trainer). The fits have a reward signal (:mod:`gpu_probe`: a tokenizer covering the vocabulary
  and a reward on the characters sampled), and each fails unless its loss is finite, its gradient
  non-zero, its weight matrices moved and stayed finite, and (R3) the replayed routes are exactly the
  ones the training forward used. Reported: seconds per step, rollout and update tokens per second
  (the update timed after a device sync), peak memory, and the update's model FLOPs utilisation
  (2 FLOPs per active parameter per token forward, 4 backward; the LM head on response tokens only,
  its share reported; attention scores not counted) against ``--peak-tflops`` (989: H100/H200 dense bf16);
* ``overhead``: R3 over GRPO and RSPO over GMPO, as ratios of median step time, between runs with the
  same π_old path (the baselines run the separate π_old pass that R3 and RSPO need);
* ``compile``: ``bench/compile.py``, eager against ``model.torch_compile`` learner steps: compile time,
  steady speed-up and break-even step count (on CUDA its random ``big`` MoE with inductor; on CPU a toy
  with ``aot_eager``, which checks the plumbing in seconds). It gets what the fits left of the budget
  (raise ``--budget`` when the fits use it all).

A failing check prints its one-line reason and the others still run; every fit's full log is kept in
``--out``/logs. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_wheels  # noqa: E402  (needs only packaging: runs before the wheels are installed)

WHEELS = "bench/wheels"  # the folder to carry to the GPU machine (ignored by git)
GPU_COMMAND = f"python bench/gpu_check.py --install {WHEELS} --out $OUT"

QWEN3_30B_A3B = {  # the layer shapes of Qwen3-30B-A3B's config.json
    "family": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
}
TOY = {
    "family": "qwen3_moe",
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}
# per device: prompts per step, completions per prompt, new tokens, sequences per forward, fit steps
WORKLOAD = {
    "cuda": {"prompts": 8, "group_size": 8, "max_new_tokens": 256, "micro_batch_size": 16, "steps": 3},
    "cpu": {"prompts": 2, "group_size": 4, "max_new_tokens": 16, "micro_batch_size": 8, "steps": 3},
}
FIT_VARIANTS = ("grpo", "r3", "gmpo", "rspo", "fsdp2")
SEPARATE_OLD_PASS = {"grpo", "r3", "gmpo", "rspo"}  # fsdp2 (GRPO) reads π_old off the update forward
# A learning rate whose AdamW steps (about lr per element) survive bf16 rounding of weights ~0.02: at
# lr 1e-6 a bf16-true weight does not move at all (half a bf16 ulp of 0.02 is 6e-5).
LR = 1e-4
# Mean |log μ - log π| above which the engine and the training forward disagree beyond rounding
LOGP_TOLERANCE = {"bfloat16": 0.1, "float32": 1e-3}
RESERVE_S = 15.0  # of the budget, kept for the report
WATCHDOG_GRACE_S = 30.0  # past the budget, the watchdog ends the check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (all MoE)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "gpu_check", help="report, configs, logs, runs"
    )
    p.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 spec)"
    )
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (fits share it)")
    p.add_argument(
        "--wheels", type=Path, help="download the wheels the GPU image lacks into this folder, then stop"
    )
    p.add_argument("--install", type=Path, help="first install offline the wheels carried in this folder")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error(f"--layers: must be >= 1, got {args.layers}")
    if args.budget <= RESERVE_S:
        p.error(f"--budget: must be > {RESERVE_S:g} seconds, got {args.budget:g}")
    if args.wheels is None and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here; use --device cpu for the toy-size run")
    return args


def print_gpu_command() -> None:
    print(f"GPU command: {GPU_COMMAND}   (carry: {WHEELS}; fetch it here first: "
          f"python bench/gpu_check.py --wheels {WHEELS})", flush=True)  # fmt: skip


def fetch_wheels(folder: Path) -> int:
    wheels = gpu_wheels.download(folder)
    size = sum(w.stat().st_size for w in wheels)
    print(f"wheels: {len(wheels)} in {folder} ({size / 1e6:.2f} MB): {', '.join(w.name for w in wheels)}")
    return 0


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    shapes = QWEN3_30B_A3B if args.device == "cuda" else TOY
    return {**shapes, "num_hidden_layers": args.layers}


def active_params(cfg: dict[str, Any]) -> tuple[int, int]:
    """``(per-token active parameters of the decoder layers, LM-head parameters)`` of a Qwen3-MoE config."""
    h, d = cfg["hidden_size"], cfg["head_dim"]
    attention = h * d * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    moe = h * cfg["num_experts"] + cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"]
    return cfg["num_hidden_layers"] * (attention + moe), h * cfg["vocab_size"]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Budget:
    """The check's deadline; a fit's timeout is an equal share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, runs_left: int) -> float:
        return max(self.left() - RESERVE_S, 0.0) / max(runs_left, 1)


# -- in-process checks ---------------------------------------------------------------------------------


def check_env(args: argparse.Namespace, installed: dict[str, Any]) -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    from lit_moe_rl.cli.compat import unsupported_versions

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
    }
    problems = unsupported_versions()
    info["summary"] = ", ".join(f"{k} {v}" for k, v in info.items())
    if installed:
        info["summary"] += f", wheels installed {installed.get('where')}"
    info["installed"] = installed
    if problems:
        raise RuntimeError("; ".join(problems))
    return info


def build_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The check's model, built on the device directly (a CPU init of 2B random weights takes minutes)."""
    import torch

    from lit_moe_rl.policy import load_policy

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    with torch.device(args.device):
        model, tok = load_policy(config=model_config(args), dtype=dtype)
    return model.to(args.device), tok


def training_experts_kernel(model: Any) -> str:
    """The experts implementation the model has as built: the one ``lit-moe-rl fit`` trains with."""
    from lit_moe_rl.experts import current_implementation

    return current_implementation(model) or "eager"


def check_experts(args: argparse.Namespace, model: Any, training_kernel: str) -> dict[str, Any]:
    """Forward + backward of one micro-batch of the update's shape with each expert kernel."""
    import torch

    from lit_moe_rl.experts import KERNEL, register

    w = WORKLOAD[args.device]
    seq = 64 + w["max_new_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (w["micro_batch_size"], seq), device=args.device)
    seconds: dict[str, float | str] = {}
    register()
    for impl in ("eager", "batched_mm", "grouped_mm", KERNEL):
        try:
            model.set_experts_implementation(impl)
            seconds[impl] = _time_fwd_bwd(model, ids, args.device)
        except Exception as err:  # a kernel this torch / device lacks is a finding, not a crash
            seconds[impl] = f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    model.set_experts_implementation(training_kernel)
    timed = {k: v for k, v in seconds.items() if isinstance(v, float)}
    if not timed:
        raise RuntimeError("no expert kernel ran: " + "; ".join(f"{k} {v}" for k, v in seconds.items()))
    fastest = min(timed, key=timed.get)
    line = ", ".join(
        f"{k} {v * 1e3:.0f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in seconds.items()
    )
    return {
        "kernel_seconds": seconds,  # "seconds" is the check's own duration (run_check)
        "fastest": fastest,
        "training_kernel": training_kernel,
        "summary": f"fastest {fastest}, training uses {training_kernel} ({line})",
    }


def _time_fwd_bwd(model: Any, ids: Any, device: str, reps: int = 3) -> float:
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids).logits[:, -1].float().sum().backward()
        sync(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def check_rollout(args: argparse.Namespace, model: Any, tok: Any, training_kernel: str) -> dict[str, Any]:
    """The project's engine vs ``model.generate`` (sampling, KV cache), both with training's experts
    kernel; and the engine's μ against the training forward's log-probs on the engine's own samples."""
    from lit_moe_rl.rollout.engine import HFEngine

    model.set_experts_implementation(training_kernel)
    w = WORKLOAD[args.device]
    prompts = [f"{i} {i + 3} {i + 7} => {3 * i + 10} =" for i in range(w["prompts"])]
    engine = HFEngine(max_new_tokens=w["max_new_tokens"], temperature=1.0)
    engine.bind(model, tok)
    generations: list[Any] = []

    def run_engine() -> int:
        generations.append(engine.generate(prompts, n=w["group_size"]))
        return int(generations[-1].response_mask.sum())

    n_tokens, engine_s = _timed(args.device, run_engine)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    plain = dict(
        do_sample=True,
        max_new_tokens=w["max_new_tokens"],
        num_return_sequences=w["group_size"],
        pad_token_id=tok.pad_token_id,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    hf_tokens, hf_s = _timed(args.device, lambda: _generated_tokens(model.generate(**enc, **plain), enc, tok))
    engine_tps, hf_tps = n_tokens / engine_s, hf_tokens / hf_s
    agreement = _engine_vs_training(model, generations[-1])
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    out = {
        "engine_tokens_per_s": engine_tps,
        "generate_tokens_per_s": hf_tps,
        "speedup": engine_tps / hf_tps,
        "experts_kernel": training_kernel,
        **agreement,
        "summary": (
            f"engine {engine_tps:,.0f} tok/s, HF generate {hf_tps:,.0f} tok/s (x{engine_tps / hf_tps:.2f}, "
            f"experts {training_kernel}); engine vs training log-probs: mean |diff| "
            f"{agreement['logp_absdiff_mean']:.2e}, max {agreement['logp_absdiff_max']:.2e}, "
            f"k3 KL {agreement['train_infer_kl']:.2e}"
        ),
    }
    if not agreement["logp_absdiff_mean"] <= LOGP_TOLERANCE[dtype]:
        raise RuntimeError(
            f"engine and training forward disagree: mean |log mu - log pi| {agreement['logp_absdiff_mean']:.3g} "
            f"> {LOGP_TOLERANCE[dtype]:g} ({dtype}); {out['summary']}"
        )
    return out


def _engine_vs_training(model: Any, gen: Any) -> dict[str, float]:
    """The engine's μ against :func:`~lit_moe_rl.policy.token_logprobs` (the trainer's log-probs)."""
    import torch

    from lit_moe_rl.metrics import logp_diff_stats, train_infer_kl
    from lit_moe_rl.policy import token_logprobs

    with torch.no_grad():
        logp, _, _ = token_logprobs(model, gen.input_ids.clone(), gen.attention_mask.clone(), gen.prompt_len)
    mask, mu = gen.response_mask, gen.infer_logp.clone().to(logp.device)
    stats = {k: float(v) for k, v in logp_diff_stats(logp.float(), mu, mask).items()}
    stats["train_infer_kl"] = float(train_infer_kl(logp.float(), mu, mask))
    return stats


def _generated_tokens(out: Any, enc: Any, tok: Any) -> int:
    new = out[:, enc["input_ids"].shape[1] :]
    return int((new != tok.pad_token_id).sum())


def _timed(device: str, fn: Callable[[], int]) -> tuple[int, float]:
    """Second run of ``fn`` (the first warms up kernels and allocators): its result and seconds."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


# -- CLI runs ------------------------------------------------------------------------------------------


def fit_config(args: argparse.Namespace, variant: str, tokenizer: Path) -> dict[str, Any]:
    """A ``lit-moe-rl fit`` YAML for one variant: the same model, data, reward and seed for all."""
    w = WORKLOAD[args.device]
    cuda = args.device == "cuda"
    callbacks: list[dict[str, Any]] = [
        {"class_path": "lit_moe_rl.callbacks.memory.MemoryCallback"},
        {"class_path": "bench.gpu_probe.WeightProbe", "init_args": {"path": str(probe_path(args, variant))}},
        {
            "class_path": "lit_moe_rl.parallel.plan_probe.PlanProbe",
            "init_args": {"path": str(plan_path(args, variant))},
        },
    ]
    if variant == "r3":
        callbacks.append(
            {
                "class_path": "lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
                "init_args": {"mode": "R3", "log_native_agreement": True},
            }
        )
    algorithm = {"gmpo": "GMPO", "rspo": "RSPO"}.get(variant, "GRPO")
    trainer: dict[str, Any] = {
        "accelerator": "gpu" if cuda else "cpu",
        "devices": 1,
        "precision": "bf16-true",
        "max_steps": w["steps"],
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(args.out / "runs"), "name": variant},
        },
        "callbacks": callbacks,
    }
    if variant == "fsdp2":
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "config": model_config(args),
            "tokenizer": str(tokenizer),
            "dtype": "bfloat16",
            "algorithm": {"class_path": f"lit_moe_rl.algorithms.{algorithm}"},
            "lr": LR,
            "micro_batch_size": w["micro_batch_size"],
            "mini_batches": 1,
            "old_logp_pass": "always" if variant in SEPARATE_OLD_PASS else "auto",
        },
        "data": {"template": "compact", "batch_size": w["prompts"], "num_val": 8, "val_batch_size": 8},
        "rollout": {
            "group_size": w["group_size"],
            "reward": {"class_path": "bench.gpu_probe.EvenCharsReward"},
            "engine": {
                "class_path": "lit_moe_rl.rollout.engine.HFEngine",
                "init_args": {"max_new_tokens": w["max_new_tokens"], "temperature": 1.0},
            },
        },
    }


def probe_path(args: argparse.Namespace, variant: str) -> Path:
    return args.out / "runs" / f"{variant}_weights.json"


def plan_path(args: argparse.Namespace, variant: str) -> Path:
    return args.out / "runs" / f"{variant}_plan.json"


def plan_vs_measured(record: dict[str, float]) -> dict[str, Any]:
    """The memory plan of a fit beside what it used: on CUDA the plan's peak against
    ``torch.cuda.max_memory_allocated``; everywhere the planned resident memory against live tensor bytes."""
    gib = 1024**3
    out = {f"{k}_gib": v / gib for k, v in record.items()}
    text = f"resident planned {record['planned_resident'] / gib:.3f} GiB vs live {record['measured_resident'] / gib:.3f} GiB"
    if "cuda_max_allocated" in record:
        text = (
            f"peak planned {record['planned_peak'] / gib:.2f} GiB vs max_memory_allocated "
            f"{record['cuda_max_allocated'] / gib:.2f} GiB; {text}"
        )
    return {**out, "plan_summary": text}


def check_fit(
    args: argparse.Namespace, variant: str, tokenizer: Path, timeout: float, site: Path | None
) -> dict[str, Any]:
    """One CLI run with its full log in ``--out``/logs; fails on a dead signal, a frozen or non-finite
    model, or (R3) a replay that is not exact."""
    if timeout < 30:
        raise TimeoutError(f"only {timeout:.0f} s of the --budget left for this run")
    config = args.out / "configs" / f"{variant}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    shutil.rmtree(args.out / "runs" / variant, ignore_errors=True)  # never read an earlier run's metrics
    probe_path(args, variant).unlink(missing_ok=True)
    plan_path(args, variant).unlink(missing_ok=True)
    config.write_text(yaml.safe_dump(fit_config(args, variant, tokenizer)))
    log = args.out / "logs" / f"fit_{variant}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lit_moe_rl.cli", "fit", f"--config={config}"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": gpu_wheels.pythonpath(ROOT, site),
    }
    run_logged(cmd, log, timeout, env, cwd=args.out)
    rows = _metrics(args.out / "runs" / variant)
    verdict = fit_verdict(
        variant, rows, json.loads(probe_path(args, variant).read_text()), WORKLOAD[args.device]["steps"]
    )
    figures = step_figures(args, rows, passes=4.0 if variant in SEPARATE_OLD_PASS else 3.0)
    plan = plan_vs_measured(json.loads(plan_path(args, variant).read_text()))
    summary = f"{figures['summary']}; {verdict['signal']}; {plan['plan_summary']}"
    return {**figures, **verdict, "memory_plan": plan, "log": str(log), "summary": summary}


def run_logged(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str], cwd: Path | None = None
) -> str:
    """Run ``cmd`` with its output in ``log``; returns the log's text. A run past ``timeout`` (its share of
    --budget) or a non-zero exit raises one line naming the log."""
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"no result within {timeout:.0f} s (its share of --budget); log: {log}"
            ) from None
    text = log.read_text()
    if proc.returncode != 0:
        tail = [line for line in text.splitlines() if line.strip()]
        raise RuntimeError(f"exit {proc.returncode}: {tail[-1] if tail else 'no output'} (log: {log})")
    return text


def _metrics(log_root: Path) -> list[dict[str, float]]:
    (path,) = sorted(log_root.glob("version_*/metrics.csv"))[-1:]
    with path.open() as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return [r for r in rows if "perf/update_s" in r]


def fit_verdict(
    variant: str, rows: list[dict[str, float]], probe: dict[str, Any], steps: int
) -> dict[str, Any]:
    """Fail unless the run had a learning signal and used it: every step logged, finite losses, a
    non-zero reward spread and gradient, weight matrices moved and finite, nothing skipped, and (R3)
    replayed routes equal to the routes used (overlap exactly 1, no real token routed natively)."""
    problems = []
    if len(rows) != steps:
        problems.append(f"{len(rows)} of {steps} steps logged")
    losses = [r.get("policy/loss", float("nan")) for r in rows]
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss {losses}")
    if not any(r.get("reward/std", 0.0) > 0 for r in rows):
        problems.append("no reward spread in any step (no learning signal)")
    norms = [r.get("policy/grad_norm", float("nan")) for r in rows]
    if not (all(math.isfinite(x) for x in norms) and max(norms, default=0.0) > 0):
        problems.append(f"gradient norms {norms}")
    if rows and rows[-1].get("policy/skipped_steps", 0.0) > 0:
        problems.append(f"{rows[-1]['policy/skipped_steps']:g} steps skipped (non-finite)")
    frozen = [name for name in probe["not_moved"] if not name.endswith(("norm.weight", ".bias"))]
    if frozen or not probe["finite"]:
        problems.append(
            f"weights: {len(frozen)} matrices did not move ({', '.join(frozen[:3])}), finite={probe['finite']}"
        )
    if variant == "r3":
        overlap = [r.get("routing/rollout_train_overlap_at_k") for r in rows]
        fallback = [r.get("routing/fallback_real_tokens") for r in rows]
        if not all(o == 1.0 for o in overlap) or not all(f == 0.0 for f in fallback):
            problems.append(f"R3 replay not exact: overlap {overlap}, real tokens routed natively {fallback}")
    if problems:
        raise RuntimeError("; ".join(problems))
    return {
        "loss": losses,
        "grad_norm": norms,
        "reward_std": [r.get("reward/std") for r in rows],
        "weights": probe,
        "train_infer_kl": [r.get("mismatch/train_infer_kl") for r in rows],
        "signal": (
            f"loss finite, grad norm max {max(norms):.2e}, {probe['moved']}/{probe['tensors']} tensors moved "
            f"({100 * probe['moved_frac']:.0f}% of sampled weights)"
            + (", R3 replay exact" if variant == "r3" else "")
        ),
    }


def step_figures(args: argparse.Namespace, rows: list[dict[str, float]], passes: float) -> dict[str, Any]:
    """Median step time, tokens per second, peak memory and MFU over the steps after the first.

    ``passes``: forward-equivalents per trained token (3 for one forward + backward, 4 with the
    separate π_old forward).
    """
    steady = rows[1:] or rows
    w = WORKLOAD[args.device]
    body, head = active_params(model_config(args))
    step_s, rollout_tps, update_tps, mfu, head_share = [], [], [], [], []
    for r in steady:
        step = r["perf/rollout_s"] + r["perf/update_s"]
        tokens = r["perf/tokens_per_s"] * step  # prompt + response tokens the update trained on
        responses = r["rollout/response_length"] * w["prompts"] * w["group_size"]
        body_flops, head_flops = 2 * passes * body * tokens, 2 * passes * head * responses
        step_s.append(step)
        rollout_tps.append(responses / r["perf/rollout_s"])
        update_tps.append(tokens / r["perf/update_s"])
        mfu.append((body_flops + head_flops) / r["perf/update_s"] / (args.peak_tflops * 1e12))
        head_share.append(head_flops / (body_flops + head_flops))
    out = {
        "steps": len(rows),
        "step_s": statistics.median(step_s),
        "rollout_tokens_per_s": statistics.median(rollout_tps),
        "update_tokens_per_s": statistics.median(update_tps),
        "update_mfu": statistics.median(mfu),
        "lm_head_flops_share": statistics.median(head_share),
        "peak_tflops": args.peak_tflops,
        # CUDA: the allocator's peak of a step; CPU: the process's resident memory
        "peak_mem_gib": max(
            r.get("perf/peak_mem_gib", r.get("perf/rss_mb", float("nan")) / 1024) for r in rows
        ),
    }
    out["summary"] = (
        f"{out['step_s']:.2f} s/step, rollout {out['rollout_tokens_per_s']:,.0f} tok/s, "
        f"update {out['update_tokens_per_s']:,.0f} tok/s, MFU {100 * out['update_mfu']:.1f}% of "
        f"{args.peak_tflops:g} TFLOP/s (LM head {100 * out['lm_head_flops_share']:.0f}% of it), "
        f"peak {out['peak_mem_gib']:.2f} GiB"
    )
    return out


def check_overhead(report: dict[str, Any]) -> dict[str, Any]:
    """Step-time ratios between runs with the same π_old path (all four run the separate pass)."""
    ratios = {}
    for name, (variant, base) in {
        "r3_over_grpo": ("fit_r3", "fit_grpo"),
        "rspo_over_gmpo": ("fit_rspo", "fit_gmpo"),
    }.items():
        if report.get(variant, {}).get("ok") and report.get(base, {}).get("ok"):
            ratios[name] = report[variant]["step_s"] / report[base]["step_s"]
    if not ratios:
        raise RuntimeError("needs fit_r3 + fit_grpo or fit_rspo + fit_gmpo to have passed")
    return {**ratios, "summary": ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items()) + " (same π_old path)"}


def check_compile(args: argparse.Namespace, timeout: float, site: Path | None) -> dict[str, Any]:
    """``bench/compile.py`` in a subprocess, its output kept in ``--out``/logs/compile.log."""
    if timeout < 30:
        raise TimeoutError(f"only {timeout:.0f} s of the --budget left for it")
    if args.device == "cuda":
        flags = ["--device", "cuda", "--model", "big", "--steps", "5"]
    else:
        flags = ["--quick", "--backend", "aot_eager"]
    log = args.out / "logs" / "compile.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": gpu_wheels.pythonpath(ROOT, site)}
    cmd = [sys.executable, str(ROOT / "bench" / "compile.py"), *flags]
    text = run_logged(cmd, log, timeout, env)
    found = dict(re.findall(r"^\s*(compile time|steady speed-up|break-even): (.+)$", text, flags=re.M))
    result = {
        "compile_s": float(found["compile time"].split()[0]),
        "speedup": float(found["steady speed-up"].split("x")[0]),
        "break_even": found["break-even"],
        "flags": " ".join(flags),
        "log": str(log),
    }
    result["summary"] = (
        f"compile {result['compile_s']:.1f} s, steady x{result['speedup']:.3f}, break-even {result['break_even']}"
    )
    return result


# -- driver --------------------------------------------------------------------------------------------


def run_check(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {first}"[:600],
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    report[name] = result
    status = "OK" if result["ok"] else "FAIL"
    print(
        f"{name}: {status} {result.get('summary') or result.get('error', '')} [{result['seconds']} s]",
        flush=True,
    )


def install_carried(folder: Path) -> tuple[dict[str, Any], Path | None]:
    """Install the carried wheels (see :func:`gpu_wheels.install`); ``(report entry, --target folder)``."""
    target = gpu_wheels.install(folder)
    where = str(target) if target else "site-packages (or already present)"
    print(f"install: wheels from {folder} -> {where}", flush=True)
    return {"from": str(folder), "where": where}, target


def main(argv: list[str] | None = None) -> int:
    print_gpu_command()
    args = parse_args(argv)
    if args.wheels is not None:
        return fetch_wheels(args.wheels)
    budget = Budget(args.budget)
    installed, site = install_carried(args.install) if args.install else ({}, None)
    return run_checks(args, budget, installed, site)


def start_watchdog(args: argparse.Namespace, budget: Budget, report: dict[str, Any]) -> threading.Timer:
    """Past the budget (plus a grace period) write what the report has and exit 124: an in-process
    check stuck on the device must not hold a lent GPU beyond the time it was given."""

    def expire() -> None:
        report["budget_exceeded"] = {"ok": False, "error": f"--budget {args.budget:g} s exceeded"}
        (args.out / f"report_{args.device}.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"budget: FAIL --budget {args.budget:g} s exceeded; partial report in {args.out}", flush=True)
        os._exit(124)

    timer = threading.Timer(max(budget.left(), 0.0) + WATCHDOG_GRACE_S, expire)
    timer.daemon = True
    timer.start()
    return timer


def run_checks(args: argparse.Namespace, budget: Budget, installed: dict[str, Any], site: Path | None) -> int:
    import torch

    from bench.gpu_probe import save_wide_tokenizer

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = lambda name: not only or name in only or name.split("_")[0] in only  # noqa: E731
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "layers": args.layers, "model": model_config(args)}
    watchdog = start_watchdog(args, budget, report)
    torch.manual_seed(0)
    if wanted("env"):
        run_check(report, "env", lambda: check_env(args, installed))
    if wanted("experts") or wanted("rollout"):
        model, tok = build_model(args)
        kernel = training_experts_kernel(model)
        if wanted("experts"):
            run_check(report, "experts", lambda: check_experts(args, model, kernel))
        if wanted("rollout"):
            run_check(report, "rollout", lambda: check_rollout(args, model, tok, kernel))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    fits = [v for v in FIT_VARIANTS if wanted(f"fit_{v}")]
    if fits:
        # outside --out: $OUT comes back from the GPU machine, and this is 3 MB of generated JSON
        tokenizer = save_wide_tokenizer(
            Path(tempfile.mkdtemp(prefix="gpu_check_tok_")), model_config(args)["vocab_size"]
        )
        print(f"fits: {len(fits)} runs share {budget.left():.0f} s of the --budget", flush=True)
    for i, variant in enumerate(fits):
        timeout = budget.share(len(fits) - i)
        run_check(
            report, f"fit_{variant}", lambda v=variant, t=timeout: check_fit(args, v, tokenizer, t, site)
        )
    if wanted("overhead"):
        run_check(report, "overhead", lambda: check_overhead(report))
    if wanted("compile"):
        run_check(report, "compile", lambda: check_compile(args, budget.share(1), site))
    watchdog.cancel()
    path = args.out / f"report_{args.device}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"report: {path}; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
