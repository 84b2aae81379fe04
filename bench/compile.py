"""``model.torch_compile``: eager vs compiled learner steps, compile time apart, and the break-even step.

    HF_HUB_OFFLINE=1 python bench/compile.py [--model tiny|big|both] [--steps 10] [--device cpu|cuda]
        [--backend inductor] [--mode default] [--static] [--r3] [--threads 1] [--warm-cache] [--quick]

The workload is the learner's step alone (π_old pass, one update, AdamW step) on synthetic rollouts of
the ``bench/vs_trl.py`` class: 32 sequences of ~35 prompt tokens and up to 52 response tokens (lengths
drawn per row, so micro-batches of 16 have varied widths after ``trim_padding``), a new rollout each step
from one seed, the same in both arms. Models: ``tiny`` is the quickstart's ``builtin:countdown-tiny-moe``;
``big`` a random Qwen3-MoE (hidden 512, 8 layers, 16 experts top-4, vocab 4096).

Per arm it prints the first step (the compiled arm's holds the compile), the steady step (median of the
next ``--steps``), the compile time (first minus steady, compiled arm, less the eager arm's own
first-step excess), the break-even (compile time / saving per step: steps after which compiling has paid
for itself; "never" when the compiled step is not faster), and dynamo's counts of compiled graphs (one per kind of
submodule when layers share them) and of graph breaks inside the compiled submodules (the eager routers
between them are not breaks: they are outside every compiled region). ``--r3`` replays random routes (forward hooks on the routers) in both arms. Inductor's on-disk
cache is a fresh temporary folder unless ``--warm-cache`` (a second run of the same model then compiles
faster: report the cold number). ``--quick``: a toy size that only checks the script runs.
Prints numbers; it is not a timed test. On a shared machine, say so next to any number you quote.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "tiny": ("builtin:countdown-tiny-moe", None),
    "big": (
        None,
        {
            "family": "qwen3_moe", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 4, "num_experts": 16, "num_experts_per_tok": 4,
            "moe_intermediate_size": 256, "vocab_size": 4096,
        },
    ),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "big", "both"), default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="steady steps timed after the first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default="default")
    parser.add_argument(
        "--static", action="store_true", help="dynamic=None (torch's default) instead of True"
    )
    parser.add_argument("--r3", action="store_true", help="replay random routes in both arms")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=35)
    parser.add_argument("--response-len", type=int, default=52)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache")
    parser.add_argument("--quick", action="store_true", help="toy size: 2 steady steps, 8 short sequences")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seqs, args.prompt_len, args.response_len, args.micro_batch_size = 2, 8, 6, 8, 4
    return args


def rollout_for(step: int, args: argparse.Namespace, vocab: int, routing: tuple[int, int, int] | None):
    """A synthetic rollout (left-padded prompts, responses of random length), the same for both arms."""
    import torch

    from lit_moe_rl.batch import Rollout

    gen = torch.Generator().manual_seed(step)
    n, p, r = args.seqs, args.prompt_len, args.response_len
    ids = torch.randint(4, vocab, (n, p + r), generator=gen)
    mask = torch.ones(n, p + r, dtype=torch.long)
    pad = torch.randint(0, max(1, p // 4), (n,), generator=gen)
    lengths = torch.randint(max(1, r // 3), r + 1, (n,), generator=gen)
    for row in range(n):
        mask[row, : pad[row]] = 0
        mask[row, p + lengths[row] :] = 0
    routes = None
    if routing is not None:
        layers, k, experts = routing
        routes = torch.rand(n, p + r, layers, experts, generator=gen).argsort(-1)[..., :k].to(torch.int8)
    return Rollout(
        input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, response_mask=mask[:, p:].bool(),
        prompt_len=p, group_size=8, temperature=1.0, rewards=torch.randn(n, generator=gen),
        advantages=torch.randn(n, generator=gen), routes=routes,
    )  # fmt: skip


def run_arm(model: str, compile_value, args: argparse.Namespace) -> dict[str, float]:
    """First-step and steady-step seconds of one arm, and dynamo's graph counts during it."""
    import torch
    from torch._dynamo.utils import counters

    from lit_moe_rl.algorithms import GRPO
    from lit_moe_rl.learner import Learner, LearnerSettings
    from lit_moe_rl.parallel.distributed import Collectives
    from lit_moe_rl.policy import load_policy, prepare_for_rl
    from lit_moe_rl.routing.adapters import moe_layout
    from lit_moe_rl.routing.replay import replay_routes

    device = torch.device(args.device)
    pretrained, config = MODELS[model]
    policy, _ = load_policy(pretrained, config, seed=0)
    prepare_for_rl(policy)
    policy.to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    contexts = []
    if args.r3:
        decoder = policy.get_decoder()
        contexts.append(
            lambda phase, micro: replay_routes(
                decoder, micro.routes, validate=False, prefix=micro.shared_prefix
            )
        )
    settings = LearnerSettings(micro_batch_size=args.micro_batch_size, torch_compile=compile_value)
    learner = Learner(
        policy,
        GRPO(),
        settings,
        optimizer,
        scheduler,
        collectives=Collectives(device),
        forward_contexts=contexts,
    )
    vocab = policy.config.vocab_size
    routing = moe_layout(policy) if args.r3 else None
    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    times = []
    for step in range(args.steps + 1):
        rollout = rollout_for(step, args, vocab, routing).to(device, skip=("routes",))
        t0 = learner.synced_clock()
        learner.step(rollout, optimizer_step=step)
        times.append(learner.synced_clock() - t0)
    return {
        "first": times[0],
        "steady": statistics.median(times[1:]),
        "graphs": counters["stats"]["unique_graphs"] - graphs0,
        "breaks": sum(counters["graph_break"].values()) - breaks0,
    }


def report(model: str, eager: dict[str, float], compiled: dict[str, float]) -> None:
    compile_s = (compiled["first"] - compiled["steady"]) - (eager["first"] - eager["steady"])
    saving = eager["steady"] - compiled["steady"]
    even = f"{compile_s / saving:.0f} steps" if saving > 0 else "never (the compiled step is not faster)"
    print(f"\n{model}: {'arm':<10}{'first step s':>14}{'steady step s':>15}{'graphs':>8}{'breaks':>8}")
    for name, arm in (("eager", eager), ("compiled", compiled)):
        line = f"{arm['first']:>14.3f}{arm['steady']:>15.4f}{arm['graphs']:>8}{arm['breaks']:>8}"
        print(f"{'':<{len(model) + 2}}{name:<10}{line}")
    print(f"  compile time: {max(compile_s, 0.0):.2f} s")
    print(f"  steady speed-up: {eager['steady'] / compiled['steady']:.3f}x ({saving * 1e3:+.2f} ms per step)")
    print(f"  break-even: {even}")


def main() -> None:
    args = parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_inductor_")
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    compile_value = {"backend": args.backend, "mode": args.mode, "dynamic": None if args.static else True}
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"torch_compile {compile_value}, r3 {args.r3}; {args.seqs} sequences x (prompt {args.prompt_len} + "
        f"response <= {args.response_len}), micro-batch {args.micro_batch_size}, {args.steps} steady steps"
    )
    for model in ("tiny", "big") if args.model == "both" else (args.model,):
        eager = run_arm(model, False, args)
        compiled = run_arm(model, compile_value, args)
        report(model, eager, compiled)


if __name__ == "__main__":
    main()
