"""One command for a lent GPU: lit-moe-rl at real layer shapes, one line per check and a JSON report.

    python bench/gpu_check.py                  # CUDA: Qwen3-30B-A3B layer shapes, 2 layers, bf16 (< 8 min, one H200)
    python bench/gpu_check.py --device cpu     # the same checks at toy sizes, fp32 (about a minute; CI runs it)

The model is a Qwen3-MoE with Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts, top-8,
moe_intermediate 768, 32 query / 4 KV heads of 128, vocabulary 151,936) but ``--layers`` layers and
random weights; ``--device cpu`` shrinks it to a toy. Checks, each printed as ``<name>: OK|FAIL ...``:

* ``env``: versions, the device, whether the installed transformers/torch are ones the project supports;
* ``experts``: transformers' MoE expert kernels (``eager``, ``batched_mm``, ``grouped_mm``) timed on one
  forward + backward of the update's shape; the fastest is reported;
* ``rollout``: the project's engine against plain ``generate`` on the same prompts, tokens per second;
* ``fit_*``: ``lit-moe-rl fit`` through the CLI for a few steps (``precision: bf16-true`` on CUDA):
  GRPO, GRPO + R3, GMPO, RSPO, and GRPO under Lightning's FSDP (CUDA only) and FSDP2
  (``ModelParallelStrategy``): seconds per step, rollout and update tokens per second, peak memory,
  and the update's model FLOPs utilisation (active-parameter matmul FLOPs: 2 per parameter per token
  forward, 4 backward; attention scores not counted) against ``--peak-tflops`` (H200 dense bf16 ~790);
* ``overhead``: R3 over GRPO and RSPO over GMPO, as ratios of median step time.

A failing check prints its one-line reason and the others still run. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    "cuda": {"prompts": 8, "group_size": 8, "max_new_tokens": 256, "micro_batch_size": 16, "steps": 4},
    "cpu": {"prompts": 2, "group_size": 4, "max_new_tokens": 16, "micro_batch_size": 8, "steps": 3},
}
FIT_VARIANTS = ("grpo", "r3", "gmpo", "rspo", "fsdp", "fsdp2")
SEPARATE_OLD_PASS = {"r3", "rspo"}  # the module reads π_old off the update forward for the others


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (all MoE)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "gpu_check", help="folder for the report and runs"
    )
    p.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="device's dense bf16 peak, for MFU")
    p.add_argument("--fit-timeout", type=float, default=240.0, help="seconds allowed to one CLI run")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error(f"--layers: must be >= 1, got {args.layers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here; use --device cpu for the toy-size run")
    return args


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
    if device == "cuda":
        torch.cuda.synchronize()


# -- in-process checks ---------------------------------------------------------------------------------


def check_env(args: argparse.Namespace) -> dict[str, Any]:
    import lightning
    import transformers

    from lit_moe_rl.compat import unsupported_versions

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
    }
    problems = unsupported_versions()
    info["summary"] = ", ".join(f"{k} {v}" for k, v in info.items())
    if problems:
        raise RuntimeError("; ".join(problems))
    return info


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    from lit_moe_rl.policy import load_policy

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model, tok = load_policy(config=model_config(args), dtype=dtype)
    return model.to(args.device), tok


def check_experts(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    """Forward + backward of one micro-batch of the update's shape with each expert kernel."""
    w = WORKLOAD[args.device]
    seq = 64 + w["max_new_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (w["micro_batch_size"], seq), device=args.device)
    seconds: dict[str, float | str] = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        try:
            model.set_experts_implementation(impl)
            seconds[impl] = _time_fwd_bwd(model, ids, args.device)
        except Exception as err:  # a kernel this torch / device lacks is a finding, not a crash
            seconds[impl] = f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    model.set_experts_implementation("eager")
    timed = {k: v for k, v in seconds.items() if isinstance(v, float)}
    fastest = min(timed, key=timed.get)
    line = ", ".join(
        f"{k} {v * 1e3:.0f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in seconds.items()
    )
    return {"seconds": seconds, "fastest": fastest, "summary": f"fastest {fastest} ({line})"}


def _time_fwd_bwd(model: torch.nn.Module, ids: torch.Tensor, device: str, reps: int = 3) -> float:
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


def check_rollout(args: argparse.Namespace, model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    """The project's engine vs ``model.generate`` (sampling, KV cache) on the same prompts."""
    from lit_moe_rl.rollout.engine import HFEngine

    w = WORKLOAD[args.device]
    prompts = [f"{i} {i + 3} {i + 7} => {3 * i + 10} =" for i in range(w["prompts"])]
    engine = HFEngine(max_new_tokens=w["max_new_tokens"], temperature=1.0)
    engine.bind(model, tok)
    n_tokens, engine_s = _timed(
        args.device, lambda: int(engine.generate(prompts, n=w["group_size"]).response_mask.sum())
    )
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
    return {
        "engine_tokens_per_s": engine_tps,
        "generate_tokens_per_s": hf_tps,
        "speedup": engine_tps / hf_tps,
        "summary": f"engine {engine_tps:,.0f} tok/s, HF generate {hf_tps:,.0f} tok/s (x{engine_tps / hf_tps:.2f})",
    }


def _generated_tokens(out: torch.Tensor, enc: Any, tok: Any) -> int:
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


def fit_config(args: argparse.Namespace, variant: str, save_dir: Path) -> dict[str, Any]:
    """A ``lit-moe-rl fit`` YAML for one variant: the same model, data and seed for all of them."""
    w = WORKLOAD[args.device]
    cuda = args.device == "cuda"
    callbacks: list[dict[str, Any]] = [{"class_path": "lit_moe_rl.callbacks.memory.MemoryCallback"}]
    if variant == "r3":
        callbacks.append(
            {
                "class_path": "lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
                "init_args": {"mode": "R3", "log_native_agreement": False},
            }
        )
    algorithm = {"grpo": "GRPO", "r3": "GRPO", "gmpo": "GMPO", "rspo": "RSPO"}.get(variant, "GRPO")
    trainer: dict[str, Any] = {
        "accelerator": "gpu" if cuda else "cpu",
        "devices": 1,
        "precision": "bf16-true" if cuda else "32-true",
        "max_steps": w["steps"],
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(save_dir), "name": variant},
        },
        "callbacks": callbacks,
    }
    if variant == "fsdp":
        trainer["strategy"] = "fsdp"
    elif variant == "fsdp2":
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "config": model_config(args),
            "dtype": "bfloat16" if cuda else "float32",
            "algorithm": {"class_path": f"lit_moe_rl.algorithms.{algorithm}"},
            "lr": 1.0e-6,
            "micro_batch_size": w["micro_batch_size"],
            "mini_batches": 1,
        },
        "data": {"template": "compact", "batch_size": w["prompts"], "num_val": 8, "val_batch_size": 8},
        "rollout": {
            "group_size": w["group_size"],
            "engine": {
                "class_path": "lit_moe_rl.rollout.engine.HFEngine",
                "init_args": {"max_new_tokens": w["max_new_tokens"], "temperature": 1.0},
            },
        },
    }


def check_fit(args: argparse.Namespace, variant: str, work: Path) -> dict[str, Any]:
    if variant == "fsdp" and args.device == "cpu":
        return {"skipped": True, "summary": "skipped: Lightning's FSDPStrategy needs CUDA (fsdp2 covers CPU)"}
    config = work / f"{variant}.yaml"
    config.write_text(yaml.safe_dump(fit_config(args, variant, work / "runs")))
    cmd = [sys.executable, "-m", "lit_moe_rl.cli", "fit", f"--config={config}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fit_timeout, env=env, cwd=work)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise RuntimeError(f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}")
    rows = _metrics(work / "runs" / variant)
    return step_figures(args, rows, passes=4.0 if variant in SEPARATE_OLD_PASS else 3.0)


def _metrics(log_root: Path) -> list[dict[str, float]]:
    (path,) = sorted(log_root.glob("version_*/metrics.csv"))[-1:]
    with path.open() as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return [r for r in rows if "perf/update_s" in r]


def step_figures(args: argparse.Namespace, rows: list[dict[str, float]], passes: float) -> dict[str, Any]:
    """Median step time, tokens per second, peak memory and MFU over the steps after the first.

    ``passes``: forward-equivalents per trained token (3 for one forward + backward, 4 with the
    separate π_old forward that replay and router-shift capture need).
    """
    steady = rows[1:] or rows
    w = WORKLOAD[args.device]
    body, head = active_params(model_config(args))
    step_s, rollout_tps, update_tps, mfu = [], [], [], []
    for r in steady:
        step = r["perf/rollout_s"] + r["perf/update_s"]
        tokens = r["perf/tokens_per_s"] * step  # prompt + response tokens the update trained on
        responses = r["rollout/response_length"] * w["prompts"] * w["group_size"]
        flops = 2 * passes * (body * tokens + head * responses)
        step_s.append(step)
        rollout_tps.append(responses / r["perf/rollout_s"])
        update_tps.append(tokens / r["perf/update_s"])
        mfu.append(flops / r["perf/update_s"] / (args.peak_tflops * 1e12))
    out = {
        "steps": len(rows),
        "step_s": statistics.median(step_s),
        "rollout_tokens_per_s": statistics.median(rollout_tps),
        "update_tokens_per_s": statistics.median(update_tps),
        "update_mfu": statistics.median(mfu),
        # CUDA: the allocator's peak of a step; CPU: the process's resident memory
        "peak_mem_gib": max(
            r.get("perf/peak_mem_gib", r.get("perf/rss_mb", float("nan")) / 1024) for r in rows
        ),
    }
    out["summary"] = (
        f"{out['step_s']:.2f} s/step, rollout {out['rollout_tokens_per_s']:,.0f} tok/s, "
        f"update {out['update_tokens_per_s']:,.0f} tok/s, MFU {100 * out['update_mfu']:.1f}%, "
        f"peak {out['peak_mem_gib']:.2f} GiB"
    )
    return out


def check_overhead(report: dict[str, Any]) -> dict[str, Any]:
    ratios = {}
    for name, (variant, base) in {
        "r3_over_grpo": ("fit_r3", "fit_grpo"),
        "rspo_over_gmpo": ("fit_rspo", "fit_gmpo"),
    }.items():
        if report.get(variant, {}).get("ok") and report.get(base, {}).get("ok"):
            ratios[name] = report[variant]["step_s"] / report[base]["step_s"]
    if not ratios:
        raise RuntimeError("needs fit_r3 + fit_grpo or fit_rspo + fit_gmpo to have passed")
    return {**ratios, "summary": ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items())}


# -- driver --------------------------------------------------------------------------------------------


def run_check(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {first}"[:300],
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    report[name] = result
    status = "OK" if result["ok"] else "FAIL"
    print(
        f"{name}: {status} {result.get('summary') or result.get('error', '')} [{result['seconds']} s]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = lambda name: not only or name in only or name.split("_")[0] in only  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "layers": args.layers, "model": model_config(args)}
    torch.manual_seed(0)
    if wanted("env"):
        run_check(report, "env", lambda: check_env(args))
    if wanted("experts") or wanted("rollout"):
        model, tok = build_model(args)
        if wanted("experts"):
            run_check(report, "experts", lambda: check_experts(args, model))
        if wanted("rollout"):
            run_check(report, "rollout", lambda: check_rollout(args, model, tok))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for variant in FIT_VARIANTS:
            if wanted(f"fit_{variant}"):
                run_check(report, f"fit_{variant}", lambda v=variant: check_fit(args, v, Path(tmp)))
    if wanted("overhead"):
        run_check(report, "overhead", lambda: check_overhead(report))
    path = args.out / f"report_{args.device}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"report: {path}; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
