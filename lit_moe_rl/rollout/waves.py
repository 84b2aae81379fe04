"""A token budget for the live KV cache: prompts generate in waves that each fit ``max_batch_tokens``.

A wave of ``k`` prompts holds ``k * n`` rows whose KV cache grows to at most ``P + R`` columns (``P``
the wave's longest prompt, ``R`` the most columns a row may add: ``max_new_tokens``, or a multi-turn
trajectory's :func:`~lit_moe_rl.rollout.multiturn.cache_columns`, its masked hole columns included), so ``k * n * (P + R) <= max_batch_tokens`` bounds the cache's token slots (the
memory planner multiplies them by the bytes of one token's K and V). Prompts keep their order; waves
run one after the other and their outputs are merged into one :class:`Generation` (prompts re-padded
on the left, responses and routes on the right). Without a budget nothing is split: one wave, the
same tensors as before.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

__all__ = ["concat_generations", "plan_waves"]


def plan_waves(prompt_lens: list[int], n: int, added: int, budget: int | None) -> list[range]:
    """Consecutive prompt ranges whose ``len * n * (max prompt + added)`` fits ``budget`` (None: one wave)."""
    if budget is None:
        return [range(len(prompt_lens))]
    waves, start, longest = [], 0, 0
    for i, length in enumerate(prompt_lens):
        need_alone = n * (length + added)
        if need_alone > budget:
            raise ValueError(
                f"rollout.max_batch_tokens: {budget} is less than one prompt's {n} rows x ({length} prompt + "
                f"{added} new) tokens = {need_alone}; raise it or lower the group size or token limits"
            )
        if (i - start + 1) * n * (max(longest, length) + added) > budget:
            waves.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, length)
    waves.append(range(start, len(prompt_lens)))
    return waves


def _pad(x: Tensor, left: int, right: int, value: float) -> Tensor:
    if not left and not right:
        return x
    shape = list(x.shape)
    parts = []
    if left:
        parts.append(x.new_full([shape[0], left, *shape[2:]], value))
    parts.append(x)
    if right:
        parts.append(x.new_full([shape[0], right, *shape[2:]], value))
    return torch.cat(parts, dim=1)


def concat_generations(gens: list, pad_token_id: int):
    """One ``Generation`` of the waves' rows, in order: prompts left-padded to the longest, responses
    (tokens, masks, μ, routes) right-padded to the longest."""
    if len(gens) == 1:
        return gens[0]
    prompt_len = max(g.prompt_len for g in gens)
    width = max(g.response_mask.shape[1] for g in gens)

    def sequence(g, name: str, value: float) -> Tensor:
        x = getattr(g, name)
        return _pad(x, prompt_len - g.prompt_len, width - g.response_mask.shape[1], value)

    def response(g, name: str, value: float) -> Tensor:
        x = getattr(g, name)
        return _pad(x, 0, width - x.shape[1], value)

    routes = None
    if gens[0].routes is not None:
        routes = torch.cat([sequence(g, "routes", -1) for g in gens])
    trajectories = None if gens[0].trajectories is None else [t for g in gens for t in g.trajectories]
    return replace(
        gens[0],
        input_ids=torch.cat([sequence(g, "input_ids", pad_token_id) for g in gens]),
        attention_mask=torch.cat([sequence(g, "attention_mask", 0) for g in gens]),
        response_mask=torch.cat([response(g, "response_mask", False) for g in gens]),
        prompt_len=prompt_len,
        infer_logp=torch.cat([response(g, "infer_logp", 0.0) for g in gens]),
        truncated=torch.cat([g.truncated for g in gens]),
        routes=routes,
        trajectories=trajectories,
    )
