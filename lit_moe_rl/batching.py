"""How a rollout's rows are cut into micro-batches (one forward each).

Every rank must run the same number of forwards and backwards (each is a collective under FSDP, each
backward one under DDP), so a rank with fewer rows repeats its first micro-batch as *padding*: the
forward runs, its outputs are discarded and its loss is multiplied by 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_moe_rl.distributed import max_over_ranks


def micro_plan(module: Any, rows: Tensor, *, fallback: Tensor | None = None) -> list[tuple[Tensor, bool]]:
    """``[(micro_rows, real)]``: ``rows`` in chunks of ``micro_batch_size``, padded to the largest
    chunk count over ranks. ``fallback`` rows stand in when ``rows`` is empty on this rank."""
    chunks = list(rows.split(module.hparams.micro_batch_size)) if len(rows) else []
    device = module.device if isinstance(module.device, torch.device) else torch.device("cpu")
    count = max_over_ranks(len(chunks), device)
    if len(chunks) == count:
        return [(chunk, True) for chunk in chunks]
    pad = chunks[0] if chunks else (fallback if fallback is not None else rows)[:1]
    return [(chunk, True) for chunk in chunks] + [(pad, False)] * (count - len(chunks))
