"""R3 overhead: step time with and without rollout routing replay, on the same samples, and route memory.

    HF_HUB_OFFLINE=1 python bench/r3_overhead.py [--steps 8] [--warmup 2] [--repeats 2] [--iters 16]

Two measurements on the model of ``configs/tiny_r3.yaml`` (tiny Qwen3-MoE, bf16 rollout engine,
fp32 trainer), each in three variants:

1. **end to end** (``--steps``): the real CLI, one run per variant, interleaved ``repeats`` times so
   that load from other processes hits them alike;
2. **paired** (``--iters``): in one process, the learner's real step (rollout: generate + score + pack
   the routes; then ``Learner.step``: π_old and the update, as the module runs them) for each variant
   in turn on the same seed, in rotating order. On a shared machine this is the number to trust.

The variants:

* ``baseline``: GRPO, the routing-replay callback inactive (``mode: off``, no logging): nothing recorded;
* ``R3``: routes recorded at rollout and replayed in every training forward;
* ``R3+diag``: R3 plus the agreement diagnostics (``routing/replay_native_*``, ``rollout_train_*``).

**The same samples in every arm.** Every completion gets reward 0, so every advantage and every
gradient is 0 and AdamW (weight decay 0) leaves the weights as they were: each step samples the same
completions under the same seed in every variant, and the update still runs its forwards and backwards
in full (only their values are 0). A digest of each step's sampled tokens and rewards is compared
across the variants, and the script stops if they differ. With real rewards the arms would train
different weights (R3 changes the gradient) and from step 1 on time different samples.

End to end, per step it reads ``perf/rollout_s + perf/update_s`` (and ``1 / perf/tokens_per_s``, the
time per token) from the run's CSV, drops the first ``warmup`` steps of each run, and prints medians and
the overhead against the baseline: R3's end-to-end step overhead over GRPO is the ``R3`` row.
``--threads`` pins torch's intra-op threads (default 1: on a shared CPU, OpenMP threads that spin while
others' processes hold the cores turn a 1 s step into 30 s). The R3 paper reports 3.45% end to end
(Appendix E); this is a tiny CPU model, where Python hook costs weigh more than on a 30B model. Prints
numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_r3.yaml"
VARIANTS = {
    "baseline": ["--trainer.callbacks.mode=off", "--trainer.callbacks.log_native_agreement=false"],
    "R3": ["--trainer.callbacks.mode=R3", "--trainer.callbacks.log_native_agreement=false"],
    "R3+diag": ["--trainer.callbacks.mode=R3", "--trainer.callbacks.log_native_agreement=true"],
}


def zero_reward(completion: str, sample: dict) -> float:
    """Reward 0: no gradient, so the weights and hence the samples stay the same in every variant."""
    return 0.0


zero_reward.thread_safe = True  # defined in __main__: worker processes could not import it

DIGESTS: list[str] = []  # the running CLI's per-step sample digests (SampleDigest appends)


def sample_digest(rollout) -> str:
    """A digest of one rollout's sampled tokens, masks and rewards."""
    digest = hashlib.sha256()
    for tensor in (rollout.input_ids, rollout.attention_mask, rollout.rewards):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class SampleDigest(L.Callback):
    """Keeps the digest of every training step's rollout (the module put it in the batch)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        DIGESTS.append(sample_digest(batch["rollout"]))


def run(variant: str, steps: int, save_dir: Path) -> tuple[list[dict[str, float]], list[str]]:
    """One CLI run of ``variant``: its training-step metrics and per-step sample digests."""
    from lit_moe_rl.cli import main

    name = f"{variant}-{time.monotonic_ns()}"
    DIGESTS.clear()
    main(
        [
            "fit",
            f"--config={CONFIG}",
            *VARIANTS[variant],
            "--rollout.reward=__main__.zero_reward",
            "--model.weight_decay=0",
            "--trainer.callbacks+=__main__.SampleDigest",
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
    if len(DIGESTS) != steps:  # the check below would compare nothing
        raise SystemExit(f"r3_overhead: {variant} ran {len(DIGESTS)} sample digests for {steps} steps")
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows], list(DIGESTS)


def check_same_samples(digests: dict[str, list[str]], where: str) -> None:
    """Stop unless every variant sampled the same tokens (and got the same rewards) at every step."""
    base = digests["baseline"]
    for variant, seen in digests.items():
        if seen != base:
            raise SystemExit(f"r3_overhead ({where}): {variant} sampled other completions than baseline")


def paired(iters: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, same work (same weights, same seed) per iteration: the rollout
    and the learner's real step (π_old read off the update forward where exact, trimmed micro-batches)."""
    from types import SimpleNamespace

    from lit_moe_rl.callbacks.rollout import RolloutCallback
    from lit_moe_rl.callbacks.routing_replay import RoutingReplayCallback
    from lit_moe_rl.data.countdown import format_prompt, generate_countdown
    from lit_moe_rl.module import MoERLModule
    from lit_moe_rl.parallel.distributed import Collectives
    from lit_moe_rl.rollout.engine import HFEngine

    config = yaml.safe_load(CONFIG.read_text())
    data, rollout_args = config["data"], config["rollout"]
    setups = {}
    for variant, overrides in VARIANTS.items():
        mode = overrides[0].split("=")[1]
        log = overrides[1].endswith("true")
        torch.manual_seed(0)
        module = MoERLModule(
            config=config["model"]["config"],
            micro_batch_size=config["model"]["micro_batch_size"],
            lr=config["model"]["lr"],
        )
        module.configure_model()
        optim = module.configure_optimizers()
        module.learner.bind(
            optim["optimizer"], optim["lr_scheduler"]["scheduler"], backward=torch.Tensor.backward,
            collectives=Collectives(),
        )  # fmt: skip
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
        digests = {}
        for variant in names[it % len(names) :] + names[: it % len(names)]:  # rotate the order
            module, callback, rollout_cb = setups[variant]
            t0 = time.perf_counter()
            rollout = rollout_cb.make_rollout(module, prompts, rows, step=it)
            callback.on_train_batch_start(None, module, {}, 0)
            module.learner.step(rollout, optimizer_step=it)
            callback.step_metrics()
            if it > 0:  # the first iteration is warm-up
                seconds[variant].append(time.perf_counter() - t0)
            digests[variant] = [sample_digest(rollout)]
        check_same_samples(digests, f"paired, step {it}")
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
        for repeat in range(args.repeats if args.steps > args.warmup else 0):
            digests = {}
            for variant in VARIANTS:
                rows, digests[variant] = run(variant, args.steps, Path(tmp))
                rows = rows[args.warmup :]
                step_s[variant] += [r["perf/rollout_s"] + r["perf/update_s"] for r in rows]
                token_ms[variant] += [1e3 / r["perf/tokens_per_s"] for r in rows]
                if variant == "R3+diag":
                    routing = {
                        k: v for k, v in rows[-1].items() if k.startswith("routing/") and "/" not in k[8:]
                    }
            check_same_samples(digests, f"end to end, repeat {repeat}")
    if step_s["baseline"]:
        title = f"end to end (CLI, perf/rollout_s + perf/update_s), {args.repeats} x {args.steps - args.warmup} steps"
        print_table(title, step_s, token_ms)
        overhead = statistics.median(step_s["R3"]) / statistics.median(step_s["baseline"]) - 1
        print(
            f"R3 end-to-end step overhead over GRPO: {overhead:+.1%} (same samples in every arm: "
            f"{args.steps} steps x {args.repeats} runs checked; R3 paper 3.45%, issue 17 target <= 5%)"
        )
    if args.iters > 0:
        title = f"paired (rollout + the learner's step, same seed, same samples), {args.iters} steps"
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
