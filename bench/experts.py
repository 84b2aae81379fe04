"""Forward + backward of the update's shape with each experts kernel (``model.experts_implementation``).

    HF_HUB_OFFLINE=1 python bench/experts.py [--rows 32] [--length 100] [--repeats 6] [--threads 2]
        [--kernels grouped_mm lit_grouped_mm eager] [--top-k 2]

The model is ``bench/vs_trl.py``'s random Qwen3-MoE (hidden 256, 4 layers, 8 experts, fp32, vocabulary 99)
with ``--top-k`` experts per token; each kernel runs a full forward, a log-softmax loss over every position
and the backward on ``--rows`` x ``--length`` tokens. For each it prints the median wall time over
``--repeats`` passes (after one warm-up; the kernels alternate pass by pass) and, from one profiled pass, the share of CPU time in
``aten::_index_put_impl_`` (the accumulating backward of advanced indexing) and ``aten::mm``; and whether
its logits equal ``grouped_mm``'s bit for bit. Prints numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.* and lit_moe_rl from this checkout

from bench.vs_trl import MODEL  # noqa: E402
from lit_moe_rl.experts import KERNEL, register  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--kernels", nargs="+", default=["grouped_mm", KERNEL, "eager"])
    return p.parse_args(argv)


def fwd_bwd(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    logits.log_softmax(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return logits.detach()


def profile_shares(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Shares of one pass's CPU time in the accumulating index_put and in matrix multiplies."""
    from torch.profiler import profile

    with profile() as prof:
        fwd_bwd(model, ids)
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows) or 1.0
    share = lambda name: sum(r.self_cpu_time_total for r in rows if r.key == name) / total  # noqa: E731
    return {"index_put": share("aten::_index_put_impl_"), "mm": share("aten::mm")}


def measure(model: torch.nn.Module, ids: torch.Tensor, kernels: list[str], repeats: int) -> dict[str, dict]:
    """Each kernel's median pass, its logits and profile shares; the kernels alternate pass by pass, so
    that the machine's drift (other load, clock) hits them alike."""
    results: dict[str, dict] = {}
    for kernel in kernels:  # warm-up, logits and profile
        model.set_experts_implementation(kernel)
        results[kernel] = {"logits": fwd_bwd(model, ids), "times": [], **profile_shares(model, ids)}
    for _ in range(repeats):
        for kernel in kernels:
            model.set_experts_implementation(kernel)
            t0 = time.perf_counter()
            fwd_bwd(model, ids)
            results[kernel]["times"].append(time.perf_counter() - t0)
    for r in results.values():
        r["seconds"] = statistics.median(r.pop("times"))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    register()
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=99, **{**MODEL, "num_experts_per_tok": args.top_k})
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(4, 99, (args.rows, args.length))
    results = measure(model, ids, args.kernels, args.repeats)
    base = results.get("grouped_mm")
    print(
        f"experts kernels: {args.rows} x {args.length} tokens, top-{args.top_k}, {args.threads} thread(s), "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print("| kernel | fwd+bwd ms | vs grouped_mm | index_put share | mm share | logits == grouped_mm |")
    print("|---|---|---|---|---|---|")
    for kernel, r in results.items():
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "n/a"
        same = torch.equal(r["logits"], base["logits"]) if base else "n/a"
        print(
            f"| {kernel} | {r['seconds'] * 1e3:.0f} | {ratio} | {r['index_put']:.1%} | {r['mm']:.1%} | {same} |"
        )


if __name__ == "__main__":
    main()
