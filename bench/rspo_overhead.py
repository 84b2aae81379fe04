"""RSPO's cost over GMPO: step time of the same updates, and the memory it keeps per token.

RSPO (arXiv 2510.23027 v2) is GMPO plus the router-shift weight; the v2 paper reports a 20.8%
throughput loss against GMPO on Qwen3-30B-A3B (3rd-party summary, docs/algorithms.md §4.4). Here the two
run the real :class:`~lit_moe_rl.module.MoERLModule` path (π_old pass, then ``mini_batches``
updates) on identical fixed rollouts from identical initial weights, so the only difference is
RSPO's work: router-logit capture in the old pass and in every update forward, the gather at the
old top-K ids, γ and its statistics. Rollouts are synthetic token ids (generation is not timed: it
is the same for both). The two fits run in two threads that take turns, one training step each,
so that load from other processes hits both alike (the order flips every round); the figure is
the ratio of the medians over post-warm-up steps, pooled over rounds (per-round ratios show the noise).

Then a breakdown: each piece of RSPO's work timed alone on one micro-batch.

    python bench/rspo_overhead.py                      # ~1-2 minutes on 2 CPU cores
    python bench/rspo_overhead.py --layers 8 --experts 64 --top-k 8 --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import threading
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_moe_rl.algorithms import GMPO, RSPO
from lit_moe_rl.batch import Rollout
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.routing.adapters import route_dtype
from lit_moe_rl.routing.record import capture_router_logits, gather_router_logp
from lit_moe_rl.routing.shift import router_shift, shift_stats, topk_set_changed

ALGORITHMS = {"GMPO": GMPO, "RSPO": RSPO}
QWEN3_30B_A3B = {"layers": 48, "top_k": 8, "experts": 128}
# RSPO v2's memory estimate (3rd-party summary, docs/algorithms.md §4.4)
PAPER_BATCH, PAPER_TOKENS = 128, 8192


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--steps", type=int, default=4, help="timed rollouts per algorithm per round (after warm-up)"
    )
    p.add_argument("--warmup", type=int, default=1, help="rollouts dropped at the start of each fit")
    p.add_argument("--rounds", type=int, default=6, help="GMPO/RSPO alternations (order flips each round)")
    p.add_argument("--layers", type=int, default=4, help="MoE layers")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seqs", type=int, default=64, help="sequences per rollout")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=48)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)"
    )
    return p.parse_args()


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        family="qwen3_moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )


def make_rollout(args: argparse.Namespace, seed: int) -> Rollout:
    """Random prompts and responses (random lengths, EOS-free), random advantages: one fixed rollout."""
    g = torch.Generator().manual_seed(seed)
    n, p, r = args.seqs, args.prompt_len, args.response_len
    input_ids = torch.randint(4, args.vocab, (n, p + r), generator=g)
    lengths = torch.randint(r // 4, r + 1, (n,), generator=g)
    response_mask = torch.arange(r)[None, :] < lengths[:, None]
    attention_mask = torch.cat([torch.ones(n, p, dtype=torch.long), response_mask.long()], dim=1)
    return Rollout(
        input_ids=input_ids.masked_fill(attention_mask == 0, 0),
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_len=p,
        group_size=8,
        temperature=1.0,
        rewards=torch.zeros(n),
        advantages=torch.randn(n, generator=g),
    )


class TurnTaking:
    """Lets several fits, each in its own thread, run one training step at a time, in turn."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.turn = 0
        self.done: set[str] = set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def _advance(self) -> None:
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                break
        self.cond.notify_all()

    def pass_on(self, name: str) -> None:
        with self.cond:
            self._advance()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.names[self.turn] == name:
                self._advance()


class StepTimer(Callback):
    """Wall and CPU seconds of each training step, and the module's own ``perf/update_s``; the step
    runs only on this fit's turn, so that the two algorithms' steps alternate under the same load."""

    def __init__(self, name: str, turns: TurnTaking) -> None:
        self.name, self.turns = name, turns
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.update: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.turns.wait(self.name)
        self._t = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.thread_time() - self._t[1])
        self.update.append(float(trainer.callback_metrics["perf/update_s"]))
        self.turns.pass_on(self.name)


def build(args: argparse.Namespace, algorithm: Any, rollouts: list[Rollout], timer: StepTimer):
    """A fresh module (same initial weights for every algorithm), its trainer and data."""
    torch.manual_seed(0)
    module = MoERLModule(
        config=model_config(args),
        algorithm=algorithm,
        lr=1e-4,
        mini_batches=args.mini_batches,
        micro_batch_size=args.micro_batch_size,
    )
    batches = [{"rollout": dataclasses.replace(r)} for r in rollouts]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches) * args.mini_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    return trainer, module, loader


def run_interleaved(
    args: argparse.Namespace, rollouts: list[Rollout], names: list[str]
) -> dict[str, StepTimer]:
    """Fit each algorithm in its own thread, their training steps strictly alternating."""
    turns = TurnTaking(names)
    timers = {name: StepTimer(name, turns) for name in names}
    fits = {name: build(args, ALGORITHMS[name](), rollouts, timers[name]) for name in names}
    errors: list[BaseException] = []

    def fit(name: str) -> None:
        trainer, module, loader = fits[name]
        try:
            trainer.fit(module, train_dataloaders=loader)
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
        finally:
            turns.finish(name)

    threads = [threading.Thread(target=fit, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timers


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def timed(*fns, repeats: int = 20) -> list[float]:
    """Median milliseconds of each of ``fns`` over ``repeats`` calls, the calls alternating between
    them (so that changing load hits all alike), after one warm-up call each."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def breakdown(args: argparse.Namespace, rollout: Rollout) -> list[tuple[str, float]]:
    """Each piece of RSPO's per-micro-batch work, timed alone on one micro-batch (milliseconds)."""
    from lit_moe_rl.policy import load_policy, token_logprobs

    torch.manual_seed(0)
    policy, _ = load_policy(None, model_config(args), seed=0)
    micro = rollout.select(torch.arange(min(args.micro_batch_size, rollout.num_sequences)))
    positions = slice(micro.prompt_len - 1, -1)

    def forward(capture: bool):
        def go():
            with torch.no_grad():
                if capture:
                    with capture_router_logits(policy, positions=positions) as cap:
                        token_logprobs(policy, micro.input_ids, micro.attention_mask, micro.prompt_len)
                    return cap
                return token_logprobs(policy, micro.input_ids, micro.attention_mask, micro.prompt_len)

        return go

    cap = forward(True)()
    old_ids, full = cap.topk, cap.router_logp
    old = gather_router_logp(full, old_ids)
    current = gather_router_logp(full + 0.01 * torch.randn_like(full), old_ids)
    mask = micro.response_mask
    shift = router_shift(current, old, mask)
    plain, captured = timed(forward(False), forward(True))
    pieces = {
        "  .router_logp / .topk (stack per-layer lists)": lambda: (cap.router_logp, cap.topk),
        "gather_router_logp at old ids": lambda: gather_router_logp(full, old_ids),
        "router_shift (gamma, floor)": lambda: router_shift(current, old, mask),
        "shift_stats (quantiles)": lambda: shift_stats(shift, mask, 0.8),
        "topk_set_changed": lambda: topk_set_changed(old_ids, old_ids, valid=mask),
    }
    rows = [("forward, no capture", plain), ("forward + capture_router_logits", captured)]
    return rows + list(zip(pieces, timed(*pieces.values()), strict=True))


def overhead_table(args: argparse.Namespace, timers: dict[str, list[StepTimer]]) -> None:
    def series(name: str, field: str, rounds: range) -> list[float]:
        return [v for i in rounds for v in getattr(timers[name][i], field)[args.warmup :]]

    all_rounds = range(args.rounds)
    timed_steps = len(series("GMPO", "wall", all_rounds))
    print(f"timed rollouts per algorithm: {timed_steps} ({args.rounds} rounds x {args.steps})")
    print("overhead = RSPO / GMPO - 1 of the medians: pooled over all rounds, then per round\n")
    print(f"{'median per rollout step':34s} {'GMPO':>10s} {'RSPO':>10s} {'overhead':>9s}   per round")
    for label, field in (
        ("perf/update_s (old pass + updates)", "update"),
        ("wall time of the training step", "wall"),
        ("CPU time of the training step", "cpu"),
    ):
        g, r = median_ms(series("GMPO", field, all_rounds)), median_ms(series("RSPO", field, all_rounds))
        per_round = []
        for i in all_rounds:
            one = range(i, i + 1)
            per_round.append(
                median_ms(series("RSPO", field, one)) / median_ms(series("GMPO", field, one)) - 1
            )
        rounds_text = " ".join(f"{100 * x:+.1f}%" for x in per_round)
        print(f"{label:34s} {g:8.1f}ms {r:8.1f}ms {100 * (r / g - 1):+8.1f}%   {rounds_text}")
    print("(paper, Qwen3-30B-A3B on GPUs: -20.8% throughput vs GMPO, 3rd-party summary; target here <= 5%)\n")


def memory_report(args: argparse.Namespace) -> None:
    """Bytes RSPO keeps per response token (``old_topk`` + ``old_router_logp``), and while capturing."""
    print("extra memory per response token, kept for the rollout (old top-K ids + their router log-probs):")
    for label, (layers, k, experts) in (
        ("this model", (args.layers, args.top_k, args.experts)),
        ("Qwen3-30B-A3B", tuple(QWEN3_30B_A3B.values())),
    ):
        id_bytes = torch.empty((), dtype=route_dtype(experts)).element_size()
        per_token = layers * k * (4 + id_bytes)
        print(
            f"  {label:14s} L*K*(4 B logp + {id_bytes} B id) = {layers}*{k}*{4 + id_bytes} = {per_token:,} B; "
            f"transient while capturing a micro-batch (log-softmax over all experts): "
            f"L*E*4 = {layers * experts * 4:,} B"
        )
        if label == "this model":
            slots = args.seqs * args.response_len
            print(
                f"  {'':14s} this rollout: {slots:,} response-token slots -> {slots * per_token / 2**20:.2f} MiB"
            )
    q = QWEN3_30B_A3B
    entries = q["layers"] * q["top_k"] * PAPER_BATCH * PAPER_TOKENS
    print(
        f"  paper's 1.5 GiB: 48 layers x top-8 x batch {PAPER_BATCH} x {PAPER_TOKENS} tokens = {entries:,} "
        f"fp32 = {entries * 4 / 2**30:.2f} GiB (+ {entries / 2**30:.2f} GiB of int8 ids)\n"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rollouts = [make_rollout(args, seed) for seed in range(args.warmup + args.steps)]
    timers: dict[str, list[StepTimer]] = {"GMPO": [], "RSPO": []}
    for round_ in range(args.rounds):
        order = ["GMPO", "RSPO"] if round_ % 2 == 0 else ["RSPO", "GMPO"]
        for name, timer in run_interleaved(args, rollouts, order).items():
            timers[name].append(timer)
    print(
        f"model: qwen3_moe hidden {args.hidden}, {args.layers} MoE layers, {args.experts} experts "
        f"top-{args.top_k}, vocab {args.vocab}; rollout {args.seqs} seqs x ({args.prompt_len} + "
        f"{args.response_len}) tokens, mini_batches {args.mini_batches}, micro-batch "
        f"{args.micro_batch_size}, {args.threads} thread(s)"
    )
    overhead_table(args, timers)
    memory_report(args)
    print("breakdown, one micro-batch, no grad (median ms):")
    for label, ms in breakdown(args, rollouts[0]):
        print(f"  {label:48s} {ms:8.2f}")


if __name__ == "__main__":
    main()
