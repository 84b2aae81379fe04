"""How a rollout's rows are cut into micro-batches (one forward each).

Every rank must run the same number of forwards and backwards (each is a collective under FSDP, each
backward one under DDP), so a rank with fewer rows repeats its first micro-batch as *padding*: the
forward runs, its outputs are discarded and its loss is multiplied by 0.

Speed (``model.trim_padding``): rows are grouped by response length (sorted) before they are cut, and
each micro-batch drops the response columns past its longest response (and the routes replayed at
them: :func:`trim_padding`). With shared prompts (``model.shared_prefix``) a micro-batch runs each of its
distinct prompts once, so cutting by length, which scatters a GRPO group over the micro-batches, runs a
prompt once per micro-batch that holds one of its rows: the plan then keeps groups together instead
(:func:`group_major_key`) wherever that runs fewer tokens (:func:`forward_tokens`): long prompts and
responses of similar lengths. The loss normalisers are the mini-batch's counts, so no order changes the
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
    groups: Tensor | None = None,
    prompt_len: int = 0,
) -> list[tuple[Tensor, bool]]:
    """``[(micro_rows, real)]``: ``rows`` in chunks of ``micro_batch_size``, padded to the largest chunk
    count over ranks. ``fallback`` rows stand in when ``rows`` is empty on this rank.

    With ``lengths [N]`` (the rows' response widths, :func:`response_widths`) the rows are sorted by length; with ``groups [N]`` too (the
    rows' prompts, run once per micro-batch with ``prompt_len`` columns) they are kept in groups instead
    when that order runs fewer tokens (:func:`forward_tokens`)."""
    if lengths is not None and len(rows):
        lengths = lengths.cpu()[rows.cpu()]
        order = torch.argsort(lengths, stable=True)
        if groups is not None:
            row_groups = groups.cpu()[rows.cpu()]
            grouped = torch.argsort(group_major_key(lengths, row_groups), stable=True)
            tokens = [
                forward_tokens(o, lengths, row_groups, prompt_len, micro_batch_size) for o in (order, grouped)
            ]
            order = grouped if tokens[1] < tokens[0] else order
        rows = rows[order.to(rows.device)]
    chunks = list(rows.split(micro_batch_size)) if len(rows) else []
    count = collectives.max(len(chunks))
    if len(chunks) == count:
        return [(chunk, True) for chunk in chunks]
    pad = chunks[0] if chunks else (fallback if fallback is not None else rows)[:1]
    return [(chunk, True) for chunk in chunks] + [(pad, False)] * (count - len(chunks))


def group_major_key(lengths: Tensor, groups: Tensor) -> Tensor:
    """A sort key ``[N]`` that keeps each group's rows together: groups by their longest response, then
    by group, each group's rows by length (so a micro-batch holds whole groups of similar lengths)."""
    longest = torch.zeros(int(groups.max()) + 1, dtype=lengths.dtype).scatter_reduce(
        0, groups, lengths, "amax"
    )
    return (longest[groups] * len(longest) + groups) * (int(lengths.max()) + 1) + lengths


def forward_tokens(
    order: Tensor, lengths: Tensor, groups: Tensor, prompt_len: int, micro_batch_size: int
) -> int:
    """Tokens the forwards of the micro-batches cut from ``order`` run with shared prompts: each distinct
    prompt once per micro-batch (``prompt_len`` columns) and every row's response padded to the
    micro-batch's longest."""
    total = 0
    for chunk in order.split(micro_batch_size):
        total += len(torch.unique(groups[chunk])) * prompt_len + len(chunk) * int(lengths[chunk].max())
    return total


def response_widths(rollout: Rollout) -> Tensor:
    """The response columns ``[N]`` each row keeps under :func:`trim_padding`: its last attended response
    column + 1 (sampled tokens and, in a multi-turn rollout, observations, which the response mask
    leaves out; 0 where none)."""
    attended = rollout.attention_mask[:, rollout.prompt_len :].bool()
    columns = torch.arange(1, attended.shape[1] + 1, device=attended.device)
    return torch.where(attended, columns, 0).amax(-1)


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
    widths = response_widths(micro)  # sampled and observation tokens
    width = max(int(widths.max()), 1) if len(widths) else 1
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
