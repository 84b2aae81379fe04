"""R3 overhead: step time with and without rollout routing replay, and the memory of the routes.

    HF_HUB_OFFLINE=1 python bench/r3_overhead.py [--steps 8] [--warmup 2] [--repeats 2] [--iters 16]

Two measurements on the model of ``configs/tiny_r3.yaml`` (tiny Qwen3-MoE, bf16 rollout engine,
fp32 trainer), each in three variants:

1. **end to end** (``--steps``): the real CLI, one run per variant, interleaved ``repeats`` times so
   that load from other processes hits them alike;
2. **paired** (``--iters``): in one process, the same step's work -- rollout (generate + score +
   pack the routes), the π_old pass, one update forward + backward over the rollout (no optimizer
   step, so the weights and hence the samples stay identical across variants) -- for each variant
   in turn on the same seed, in rotating order. On a shared machine this is the number to trust.

The variants:

* ``baseline``: the routing-replay callback inactive (``mode: off``, no logging): nothing recorded;
* ``R3``: routes recorded at rollout and replayed in the π_old pass and the update;
* ``R3+diag``: R3 plus the agreement diagnostics (``routing/replay_native_*``, ``rollout_train_*``).

End to end, per step it reads ``perf/rollout_s + perf/update_s`` (and ``1 / perf/tokens_per_s``, the
time per token, which does not depend on how long the sampled answers happen to be) from the run's
CSV, drops the first ``warmup`` steps of each run, and prints medians and the overhead against the
baseline. ``--threads`` pins torch's intra-op threads (default 1: on a shared CPU, OpenMP threads
that spin while others' processes hold the cores turn a 1 s step into 30 s).
The R3 paper reports 3.45% end to end (Appendix E); this is a tiny CPU model, where Python hook
costs weigh more than on a 30B model. Prints numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_r3.yaml"
VARIANTS = {
    "baseline": ["--trainer.callbacks.mode=off", "--trainer.callbacks.log_native_agreement=false"],
    "R3": ["--trainer.callbacks.mode=R3", "--trainer.callbacks.log_native_agreement=false"],
    "R3+diag": ["--trainer.callbacks.mode=R3", "--trainer.callbacks.log_native_agreement=true"],
}


def run(variant: str, steps: int, save_dir: Path) -> list[dict[str, float]]:
    from lit_moe_rl.cli import main

    name = f"{variant}-{time.monotonic_ns()}"
    main(
        [
            "fit",
            f"--config={CONFIG}",
            *VARIANTS[variant],
            f"--trainer.max_steps={steps}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    (path,) = (save_dir / name).rglob("metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/update_s")]
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def zero_reward(completion: str, sample: dict) -> float:
    return 0.0


zero_reward.thread_safe = True  # defined in __main__: worker processes could not import it


def paired(iters: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, same work (same weights, same seed) per iteration."""
    from types import SimpleNamespace

    from lit_moe_rl.callbacks.rollout import RolloutCallback
    from lit_moe_rl.callbacks.routing_replay import RoutingReplayCallback
    from lit_moe_rl.data.countdown import format_prompt, generate_countdown
    from lit_moe_rl.module import MoERLModule
    from lit_moe_rl.rollout.engine import HFEngine

    config = yaml.safe_load(CONFIG.read_text())
    data, rollout_args = config["data"], config["rollout"]
    setups = {}
    for variant, overrides in VARIANTS.items():
        mode = overrides[0].split("=")[1]
        log = overrides[1].endswith("true")
        torch.manual_seed(0)
        module = MoERLModule(
            config=config["model"]["config"], micro_batch_size=config["model"]["micro_batch_size"]
        )
        module.configure_model()
        engine = HFEngine(**rollout_args["engine"]["init_args"])
        rollout_cb = RolloutCallback(engine=engine, reward=zero_reward, group_size=rollout_args["group_size"])
        callback = RoutingReplayCallback(mode=mode, log_native_agreement=log)
        trainer = SimpleNamespace(callbacks=[callback, rollout_cb])
        callback.setup(trainer, module, "fit")
        callback.on_fit_start(trainer, module)
        rollout_cb._bind(module)
        setups[variant] = (module, callback, rollout_cb)
    counts = {k: data[k] for k in ("min_numbers", "max_numbers", "max_number", "max_target")}
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for it in range(iters + 1):
        rows = generate_countdown(data["batch_size"], seed=it, **counts)
        prompts = [format_prompt(row, data["template"]) for row in rows]
        for variant in names[it % len(names) :] + names[: it % len(names)]:  # rotate the order
            module, callback, rollout_cb = setups[variant]
            t0 = time.perf_counter()
            rollout = rollout_cb.make_rollout(module, prompts, rows, step=it)
            callback.on_train_batch_start(None, module, {}, 0)
            learner = module.learner
            learner.compute_old_logprobs(rollout)
            for micro_rows in torch.arange(rollout.num_sequences).split(learner.settings.micro_batch_size):
                micro = rollout.select(micro_rows)  # untrimmed in every variant: the same work
                with learner.forward_context("update", micro):
                    logp, _, _ = learner.sequence_logprobs(micro)
                    (logp * micro.response_mask).sum().backward()
            callback.step_metrics()
            module.policy.zero_grad(set_to_none=True)
            if it > 0:  # the first iteration is warm-up
                seconds[variant].append(time.perf_counter() - t0)
    return seconds


def print_table(title: str, step_s: dict[str, list[float]], token_ms: dict[str, list[float]] | None) -> None:
    base_step = statistics.median(step_s["baseline"])
    print(f"\n== {title} ==")
    header = f"{'variant':>9} | median step s | overhead | median of paired ratios"
    print(header + (" | median ms/token | overhead" if token_ms else ""))
    for variant in VARIANTS:
        step = statistics.median(step_s[variant])
        ratios = [a / b for a, b in zip(step_s[variant], step_s["baseline"], strict=True)]
        line = f"{variant:>9} | {step:13.3f} | {step / base_step - 1:+7.1%} | {statistics.median(ratios) - 1:+23.1%}"
        if token_ms:
            token, base_token = statistics.median(token_ms[variant]), statistics.median(token_ms["baseline"])
            line += f" | {token:15.3f} | {token / base_token - 1:+7.1%}"
        print(line)


def route_memory(layers: int, top_k: int, itemsize: int, prompt: int, response: int, group: int) -> str:
    per_token = layers * top_k * itemsize
    dense = group * (prompt + response) * per_token
    store = (prompt + group * response) * per_token
    return (
        f"L={layers:>2} K={top_k} {itemsize}B ids: {per_token:>5} B/token; a group of G={group}, P={prompt}, "
        f"R={response}: dense {dense / 2**20:9.3f} MiB, store {store / 2**20:9.3f} MiB "
        f"(saves {1 - store / dense:6.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per end-to-end run (0: skip)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved end-to-end runs per variant")
    parser.add_argument("--iters", type=int, default=16, help="paired steps per variant (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
    token_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    routing: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats if args.steps > args.warmup else 0):
            for variant in VARIANTS:
                rows = run(variant, args.steps, Path(tmp))[args.warmup :]
                step_s[variant] += [r["perf/rollout_s"] + r["perf/update_s"] for r in rows]
                token_ms[variant] += [1e3 / r["perf/tokens_per_s"] for r in rows]
                if variant == "R3+diag":
                    routing = {
                        k: v for k, v in rows[-1].items() if k.startswith("routing/") and "/" not in k[8:]
                    }
    if step_s["baseline"]:
        title = f"end to end (CLI, perf/rollout_s + perf/update_s), {args.repeats} x {args.steps - args.warmup} steps"
        print_table(title, step_s, token_ms)
    if args.iters > 0:
        title = f"paired (rollout + pi_old pass + update fwd/bwd, same seed), {args.iters} steps"
        print_table(title, paired(args.iters), None)
    print("\n== route memory ==")
    if routing:
        print(
            f"this run: {routing['routing/route_bytes']:.0f} B/token, store {routing['routing/store_bytes']:.0f} B "
            f"per rollout, {routing['routing/store_saved_frac']:.1%} less than a dense [N, P+R, L, K] tensor"
        )
    print(route_memory(4, 2, 1, prompt=13, response=10, group=8) + "   <- tiny_r3.yaml")
    print(route_memory(48, 8, 1, prompt=2048, response=30720, group=8) + "   <- Qwen3-30B-A3B, R3 paper")
    print(route_memory(48, 8, 1, prompt=2048, response=2048, group=8) + "   <- same, short answers")
    print(route_memory(48, 8, 4, prompt=2048, response=30720, group=8) + "   <- int32 ids, as SGLang returns")


if __name__ == "__main__":
    main()
