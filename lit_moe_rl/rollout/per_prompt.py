"""Sampling each prompt under its own seed, so that its completions do not depend on its batch.

A batched ``generate`` draws every row's tokens from one random stream: a prompt's completions change
with the prompts it is batched with, so W ranks with ``b`` prompts each sample differently from one
process with ``W·b``. Seeding each prompt by ``(seed, step, prompt text)`` and generating it alone
makes its completions a function of that triple only (and of the weights), whichever rank or batch
it lands in. The cost is one engine call per prompt.

The prompt's position in the step's *global* batch is mixed in too: the same prompt text twice in a
step (a dataset with duplicates, on one rank or two) must sample two different groups. The position is
``local index · W + rank``: :class:`~lit_moe_rl.data.sampler.ResumableSampler` deals the one global
order out to ranks round-robin, so W ranks with ``b`` prompts each give every prompt the position it
has in one process's batch of ``W·b``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import torch
import torch.distributed as dist

from lit_moe_rl.parallel.distributed import is_distributed, world_size
from lit_moe_rl.rollout.engine import Generation
from lit_moe_rl.rollout.waves import concat_generations


def prompt_seed(seed: int, step: int, prompt: Any, index: int = 0) -> int:
    """A 63-bit seed from the run seed, the step, the prompt's position ``index`` in the step's global
    batch and the prompt (CRC-32 of its text, or of its chat messages as sorted JSON)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    mixed = (seed * 1_000_003 + step) * 1_000_000_007 + index
    return (mixed * 4_294_967_311 + zlib.crc32(text.encode())) % (2**63 - 1)


def global_positions(count: int) -> list[int]:
    """Positions in the step's global batch of this rank's ``count`` prompts: ``i · W + rank``."""
    rank = dist.get_rank() if is_distributed() else 0
    return [i * world_size() + rank for i in range(count)]


def generate_per_prompt(
    engine: Any,
    prompts: list[Any],
    *,
    n: int,
    seed: int,
    step: int,
    record_routes: bool = False,
    positions: list[int] | None = None,
) -> Generation:
    """``engine.generate`` once per prompt under :func:`prompt_seed`, concatenated prompt-major.

    ``positions``: each prompt's position in the step's global batch (default :func:`global_positions`).
    """
    positions = global_positions(len(prompts)) if positions is None else positions
    parts = []
    for prompt, index in zip(prompts, positions, strict=True):
        torch.manual_seed(prompt_seed(seed, step, prompt, index))
        parts.append(engine.generate([prompt], n=n, record_routes=record_routes))
    return concat_generations(parts, pad_token_id=engine.tokenizer.pad_token_id)
