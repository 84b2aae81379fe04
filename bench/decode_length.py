"""Decode time per token against response length, up to 4k tokens: is the engine's loop flat?

    HF_HUB_OFFLINE=1 python bench/decode_length.py [--lengths 256 1024 4096] [--rows 8] [--threads 1]

(``bench/scaling.py --decode-lengths`` prints the engine's row of this table, :func:`time_per_token`.)

A tiny random Qwen3-MoE decodes ``--rows`` rows for each length with EOS switched off (every row runs
the whole length), with each KV cache the engine can use (:mod:`lit_moe_rl.rollout.kv`):
transformers' concatenating cache, the doubling cache (used from ``GROW_FROM`` tokens on where the
cache is not written in place) and the cache written in place into buffers reserved for the whole
generation (the engine's choice for ``sdpa`` models without sliding windows). It prints the wall time
per token over the last quarter of each run (where the cache is longest) and the positions the cache
copied per token. Attention itself still grows with the cache; on a tiny model at these lengths the
per-step Python and MoE cost dominate, so flat means the loop adds nothing that grows. CPU numbers on
a shared machine are noisy: compare rows of one run. Prints numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_moe_rl.policy import load_policy  # noqa: E402
from lit_moe_rl.rollout import decode as decode_module  # noqa: E402
from lit_moe_rl.rollout.sampling import SamplingParams  # noqa: E402


class _Clock:
    """Times each decode step (one head call per step). With one intra-op thread it reads this
    thread's CPU time, not the wall clock: on a machine shared with other jobs the wall clock
    counts their time slices too (ratios between lengths swung 1.3-3.3x run to run), CPU time does
    not (1.47-1.60x)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stamps: list[float] = []
        now = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda *_: self.stamps.append(now())
        )


CACHES = ("concatenate", "doubling", "in place")


def run(model, tok, length: int, rows: int, cache: str) -> dict[str, float]:
    grow_from, decode_module.GROW_FROM = decode_module.GROW_FROM, (1 if cache == "doubling" else 10**9)
    in_place, decode_module.IN_PLACE = decode_module.IN_PLACE, cache == "in place"
    layers: list = []
    original = decode_module._Stepper.__init__

    def spy(self, model, max_added=0, **kwargs):
        original(self, model, max_added, **kwargs)
        layers.extend(self.cache.layers)

    decode_module._Stepper.__init__ = spy
    clock = _Clock(model)
    enc = tok(["3 5 7 => 22 ="] * rows, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        torch.manual_seed(0)
        decode_module.decode(model, enc["input_ids"], enc["attention_mask"], n=1, max_new_tokens=length,
                             params=SamplingParams(), eos_token_ids=[-1], pad_token_id=0)  # fmt: skip
    finally:
        clock.handle.remove()
        decode_module._Stepper.__init__ = original
        decode_module.GROW_FROM, decode_module.IN_PLACE = grow_from, in_place
    tail = clock.stamps[-(length // 4) :]
    per_token = (tail[-1] - tail[0]) / max(len(tail) - 1, 1)
    copied = sum(getattr(layer, "copied_positions", 0) for layer in layers) / max(len(layers), 1)
    if cache == "concatenate":  # concatenation copies the whole cache each step
        prompt = enc["input_ids"].shape[1]
        copied = rows * sum(prompt + t for t in range(length))
    return {"ms_per_token": 1000 * per_token, "copied_per_token": copied / (rows * length)}


def tiny_model(longest: int):
    """The random Qwen3-MoE both benches decode with (positions for ``longest`` new tokens)."""
    torch.manual_seed(0)
    model, tok = load_policy(
        config={"family": "qwen3_moe", "vocab_size": 64, "max_position_embeddings": longest + 64}
    )
    return model.eval(), tok


def time_per_token(model, tok, lengths: list[int], rows: int) -> list[dict[str, float]]:
    """ms per token of the engine's own loop at each of ``lengths``, from ONE decode of ``max(lengths)``
    tokens (EOS off): the mean step time over the last quarter before each length, so the ratios
    between lengths share the machine's load. Each row also has the ratio to the shortest length."""
    clock = _Clock(model)
    enc = tok(["3 5 7 => 22 ="] * rows, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        torch.manual_seed(0)
        decode_module.decode(model, enc["input_ids"], enc["attention_mask"], n=1, max_new_tokens=max(lengths),
                             params=SamplingParams(), eos_token_ids=[-1], pad_token_id=0)  # fmt: skip
    finally:
        clock.handle.remove()
    out = []
    for length in sorted(lengths):
        window = clock.stamps[length - max(length // 4, 2) : length]
        ms = 1000 * (window[-1] - window[0]) / (len(window) - 1)
        out.append(
            {
                "length": length,
                "ms_per_token": ms,
                "vs_shortest": ms / (out[0]["ms_per_token"] if out else ms),
            }
        )
    return out


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = tiny_model(max(args.lengths))
    rows = []
    print("length   cache          ms/token (last quarter)   positions copied per token")
    for length in args.lengths:
        for cache in CACHES:
            out = run(model, tok, length, args.rows, cache) | {"length": length, "cache": cache}
            rows.append(out)
            print(f"{length:>6}   {cache:<12} {out['ms_per_token']:>14.3f} {out['copied_per_token']:>28.1f}")
    return rows


if __name__ == "__main__":
    main()
