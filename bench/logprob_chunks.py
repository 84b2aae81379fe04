"""Cost of the training log-prob pass by LM-head chunk size, at a real vocabulary.

    HF_HUB_OFFLINE=1 python bench/logprob_chunks.py [--vocab 151936] [--rows 16] [--length 128]
        [--chunks 2048 1024 256 auto 16] [--repeats 2] [--threads 1]

For each chunk size, forward + backward of :func:`lit_moe_rl.policy.token_logprobs` on a 1-layer,
hidden-64 Qwen3-MoE: wall time, user and kernel (sys) CPU time and minor page faults of the last
repeat. On CPU, fp32 logit chunks above 32 MiB are served by a fresh ``mmap`` each time and faulted
in page by page (kernel time); ``auto`` is :func:`lit_moe_rl.policy.logprob_chunk_tokens`. Prints
numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lit_moe_rl.policy import load_policy, logprob_chunk_tokens, token_logprobs


def measure(model: torch.nn.Module, ids: torch.Tensor, chunk: int, repeats: int) -> dict[str, float]:
    """Wall/user/sys seconds and minor faults of the last of ``repeats`` forward+backward passes."""
    attention = torch.ones_like(ids)
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        logp, _, _ = token_logprobs(model, ids, attention, 8, chunk_size=chunk)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {
        "wall": wall,
        "user": r1.ru_utime - r0.ru_utime,
        "sys": r1.ru_stime - r0.ru_stime,
        "faults": r1.ru_minflt - r0.ru_minflt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--chunks", nargs="+", default=["2048", "1024", "256", "auto", "16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = {"family": "qwen3_moe", "vocab_size": args.vocab, "hidden_size": 64, "num_hidden_layers": 1}
    model, _ = load_policy(config=config)
    ids = torch.randint(
        3, args.vocab, (args.rows, 8 + args.length), generator=torch.Generator().manual_seed(0)
    )
    print(f"V={args.vocab}, {args.rows} x {args.length} response tokens, {args.threads} thread(s)")
    print(f"{'chunk':>10} {'wall s':>8} {'user s':>8} {'sys s':>8} {'page faults':>12}")
    for name in args.chunks:
        chunk = logprob_chunk_tokens(args.vocab, torch.device("cpu")) if name == "auto" else int(name)
        m = measure(model, ids, chunk, args.repeats)
        label = f"{chunk} ({name})" if name == "auto" else name
        print(f"{label:>10} {m['wall']:8.2f} {m['user']:8.2f} {m['sys']:8.2f} {m['faults']:12d}", flush=True)


if __name__ == "__main__":
    main()
