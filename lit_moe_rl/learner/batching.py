"""How a rollout's rows are cut into micro-batches (one forward each).

Every rank must run the same number of forwards and backwards (each is a collective under FSDP, each
backward one under DDP), so a rank with fewer rows repeats its first micro-batch as *padding*: the
forward runs, its outputs are discarded and its loss is multiplied by 0.

Speed (``model.trim_padding``): rows are grouped by response length (sorted) before they are cut, and
each micro-batch drops the response columns past its longest response (and the routes replayed at
them: :func:`trim_padding`). The loss normalisers are the mini-batch's counts, so neither changes the
objective: only float rounding differs.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from lit_moe_rl.batch import Rollout
from lit_moe_rl.parallel.distributed import Collectives


def micro_plan(
    rows: Tensor,
    micro_batch_size: int,
    collectives: Collectives,
    *,
    fallback: Tensor | None = None,
    lengths: Tensor | None = None,
) -> list[tuple[Tensor, bool]]:
    """``[(micro_rows, real)]``: ``rows`` in chunks of ``micro_batch_size`` (sorted by ``lengths`` when
    given), padded to the largest chunk count over ranks. ``fallback`` rows stand in when ``rows`` is
    empty on this rank."""
    if lengths is not None and len(rows):
        rows = rows[torch.argsort(lengths[rows.to(lengths.device)].cpu(), stable=True)]
    chunks = list(rows.split(micro_batch_size)) if len(rows) else []
    count = collectives.max(len(chunks))
    if len(chunks) == count:
        return [(chunk, True) for chunk in chunks]
    pad = chunks[0] if chunks else (fallback if fallback is not None else rows)[:1]
    return [(chunk, True) for chunk in chunks] + [(pad, False)] * (count - len(chunks))


def trim_padding(micro: Rollout) -> Rollout:
    """``micro`` without the response columns past its longest response (all padding; a multi-turn
    observation is attended, so it is never cut even where no token is sampled): every
    ``[n, P + R, ...]`` tensor is cut to ``P + r`` columns and every ``[n, R, ...]`` one to ``r``.

    Routes (R3, arXiv 2510.11370 §4.1) are cut with the tokens: a dense ``[n, P + R, L, K]`` tensor like
    any other, a :class:`~lit_moe_rl.routing.store.RouteStore` view by
    :meth:`~lit_moe_rl.routing.store.RouteStore.keep_response`. Rows were already put in the micro-batch's
    order by :meth:`Rollout.select <lit_moe_rl.batch.Rollout.select>`, so every kept token replays the
    experts it was sampled with.
    """
    used = (
        micro.attention_mask[:, micro.prompt_len :].bool().any(0).nonzero()
    )  # sampled and observation tokens
    width = int(used.max()) + 1 if len(used) else 1
    full = micro.response_len
    if width == full:
        return micro
    total = micro.prompt_len + full
    updates = {}
    for f in fields(micro):
        value = getattr(micro, f.name)
        if isinstance(value, Tensor) and value.dim() >= 2:
            if value.shape[1] == total:
                updates[f.name] = value[:, : micro.prompt_len + width]
            elif value.shape[1] == full:
                updates[f.name] = value[:, :width]
        elif hasattr(value, "keep_response"):  # a RouteStore view: trimmed without copying
            updates[f.name] = value.keep_response(width)
    return replace(micro, **updates)


def pad_columns(x: Tensor, width: int) -> Tensor:
    """``x [n, r, ...]`` right-padded with zeros to ``[n, width, ...]`` (undoes :func:`trim_padding`)."""
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], dim=1)


def scatter_rows(parts: list[tuple[Tensor, Tensor]], num_rows: int, width: int) -> Tensor:
    """``[num_rows, width, ...]`` from ``(rows, values [n, r, ...])`` pieces (rows in any order)."""
    first = parts[0][1]
    out = first.new_zeros(num_rows, width, *first.shape[2:])
    for rows, values in parts:
        out[rows.to(out.device)] = pad_columns(values, width)
    return out
