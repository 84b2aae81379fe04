"""Sampling each prompt under its own seed, so that its completions do not depend on its batch.

A batched ``generate`` draws every row's tokens from one random stream: a prompt's completions change
with the prompts it is batched with, so W ranks with ``b`` prompts each sample differently from one
process with ``W·b``. Seeding each prompt by ``(seed, step, prompt text)`` and generating it alone
makes its completions a function of that triple only (and of the weights), whichever rank or batch
it lands in. The cost is one engine call per prompt.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import torch
from torch import Tensor

from lit_moe_rl.rollout.engine import Generation


def prompt_seed(seed: int, step: int, prompt: Any) -> int:
    """A 63-bit seed from the run seed, the step and the prompt (CRC-32 of its text, or of its chat
    messages as sorted JSON)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return ((seed * 1_000_003 + step) * 4_294_967_311 + zlib.crc32(text.encode())) % (2**63 - 1)


def generate_per_prompt(
    engine: Any, prompts: list[Any], *, n: int, seed: int, step: int, record_routes: bool = False
) -> Generation:
    """``engine.generate`` once per prompt under :func:`prompt_seed`, concatenated prompt-major."""
    parts = []
    for prompt in prompts:
        torch.manual_seed(prompt_seed(seed, step, prompt))
        parts.append(engine.generate([prompt], n=n, record_routes=record_routes))
    return concat_generations(parts, pad_token_id=engine.tokenizer.pad_token_id)


def concat_generations(parts: list[Generation], *, pad_token_id: int) -> Generation:
    """Stack generations: prompts left-padded to the longest ``P``, responses right-padded to the longest ``R``."""
    prompt_len = max(g.prompt_len for g in parts)
    response_len = max(g.response_mask.shape[1] for g in parts)

    def pad(
        g: Generation, x: Tensor, value: float
    ) -> Tensor:  # [N, P+R, ...] -> [N, prompt_len+response_len, ...]
        left, right = prompt_len - g.prompt_len, response_len - g.response_mask.shape[1]
        return torch.cat([x.new_full((x.shape[0], left, *x.shape[2:]), value), x,
                          x.new_full((x.shape[0], right, *x.shape[2:]), value)], dim=1)  # fmt: skip

    def right(x: Tensor, value: float) -> Tensor:  # [N, R] -> [N, response_len]
        return torch.cat([x, x.new_full((x.shape[0], response_len - x.shape[1]), value)], dim=1)

    routes = [pad(g, g.routes, -1) for g in parts] if parts[0].routes is not None else None
    return Generation(
        input_ids=torch.cat([pad(g, g.input_ids, pad_token_id) for g in parts]),
        attention_mask=torch.cat([pad(g, g.attention_mask, 0) for g in parts]),
        response_mask=torch.cat([right(g.response_mask, False) for g in parts]),
        prompt_len=prompt_len,
        infer_logp=torch.cat([right(g.infer_logp, 0.0) for g in parts]),
        truncated=torch.cat([g.truncated for g in parts]),
        routes=torch.cat(routes) if routes is not None else None,
    )
