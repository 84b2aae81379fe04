"""R3 §3.3 on your own stack: the KL between two training forwards of the same sequences in different
batch compositions (one batch vs shuffled micro-batches), for a model, dtype and device of your choice.

    python bench/composition_kl.py                                   # built-in warm start, fp32 and bf16
    python bench/composition_kl.py --pretrained /models/Qwen3-30B-A3B --dtypes bfloat16 --device cuda

Sequences are sampled by the project's engine from Countdown prompts; each dtype's line prints the KL,
F(τ=2) and the largest per-token log-prob difference for each micro-batch size. The R3 paper measured
a KL of 8.4e-4 between two Megatron forwards of Qwen3-30B-A3B (§3.3). Prints numbers; not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_moe_rl.data.countdown import format_prompt, generate_countdown  # noqa: E402
from lit_moe_rl.nondeterminism import composition_kl  # noqa: E402
from lit_moe_rl.policy import load_policy  # noqa: E402
from lit_moe_rl.rollout.engine import HFEngine  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", default="builtin:countdown-tiny-moe")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated model dtypes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--micro-batch-sizes", default="1,4,16")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.micro_batch_sizes.split(",")]
    for dtype in args.dtypes.split(","):
        model, tok = load_policy(args.pretrained, dtype=dtype)
        model.to(args.device)
        engine = HFEngine(max_new_tokens=args.max_new_tokens)
        engine.bind(model, tok)
        rows = generate_countdown(
            args.prompts, seed=1, min_numbers=3, max_numbers=3, max_number=20, max_target=100
        )
        prompts = [format_prompt(row, "compact") for row in rows]
        gen = engine.generate(prompts, n=args.group_size)
        for size in sizes:
            m = composition_kl(
                model,
                gen.input_ids,
                gen.attention_mask,
                gen.response_mask,
                gen.prompt_len,
                micro_batch_size=size,
            )
            print(
                f"{dtype:>9} micro_batch {size:>3}: KL {m['kl']:.3e}  F(tau=2) {m['extreme_frac_tau2']:.4f}  "
                f"max|dlogp| {m['logp_absdiff_max']:.3e}  ({m['tokens']} tokens)"
            )


if __name__ == "__main__":
    main()
