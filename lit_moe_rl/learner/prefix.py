"""Shared-prompt forwards: the rows of a micro-batch that share a prompt run it once.

A GRPO-family rollout samples ``G`` completions per prompt, so a training forward over ``[n, P + R]``
computes every prompt ``G`` times. Prefix Grouper (arXiv 2506.05433) runs each distinct
prompt once and lets every completion attend to its prompt's keys and values: the same attention, the
same outputs, fewer tokens. Here the policy's decoder runs twice
(:func:`lit_moe_rl.policy.token_logprobs`): the ``U`` distinct prompts ``[U, P]`` with a KV cache, then
the ``n`` responses ``[n, R]`` on that cache expanded to their rows. Gradients reach the prompt through
the expansion (summed over the rows that share it), as they would through ``G`` copies.

:class:`SharedPrefix` is the layout only: which rows share which prompt, and how a per-position tensor
``[n, P + R, ...]`` splits into the two forwards' ``[U, P, ...]`` and ``[n, R, ...]`` and joins back.
Every consumer of per-position router outputs (R3 replay, R2 recording, RSPO's capture) splits and
joins with it, so what each sees is the ``[n, P + R]`` layout of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SharedPrefix:
    """Rows ``first [U]`` hold the ``U`` distinct prompts; row ``i`` uses prompt ``inverse[i]``."""

    first: Tensor  # [U] long: one row (the first) of each distinct prompt, in order of appearance
    inverse: Tensor  # [n] long: the distinct prompt of each row, an index into ``first``
    prompt_len: int  # P: columns of the prompt (left-padded)

    @classmethod
    def find(
        cls, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, groups: Tensor | None = None
    ) -> SharedPrefix | None:
        """The layout of ``input_ids [n, P + R]``'s prompts, or None when there is no prompt or no
        response column. A layout is returned even when no two rows share a prompt: every rank must run
        the same forwards (under FSDP each decoder call is a collective), whatever its rows.

        ``groups [n]``: rows share a prompt only within their group (a GRPO group: its rows were
        sampled from one prefill, so they share the prompt's recorded routes too; two groups with
        the same prompt text may have routed it differently)."""
        n = input_ids.shape[0]
        if prompt_len < 1 or input_ids.shape[1] <= prompt_len:
            return None
        parts = [input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)]
        if groups is not None:
            parts.insert(0, groups.to(input_ids.device, input_ids.dtype)[:, None])
        key = torch.cat(parts, dim=1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)  # sorted by value
        rows = torch.arange(n, device=input_ids.device)
        first = torch.full((n,), n, dtype=torch.long, device=input_ids.device).scatter_reduce(
            0, inverse, rows, "amin"
        )
        first = first[first < n]
        order = torch.argsort(first)  # distinct prompts in order of their first row
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        return cls(first=first[order], inverse=rank[inverse], prompt_len=prompt_len)

    @property
    def num_prompts(self) -> int:
        return len(self.first)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [n, P + R, ...]`` -> the prompt forward's ``[U, P, ...]`` and the response forward's ``[n, R, ...]``."""
        p = self.prompt_len
        return x[self.first.to(x.device), :p], x[:, p:]

    def expand(self, x: Tensor) -> Tensor:
        """``x [U, ...]`` -> ``[n, ...]``: each row's prompt."""
        return x.index_select(0, self.inverse.to(x.device))

    def join(self, prompt: Tensor, response: Tensor) -> Tensor:
        """``prompt [U, p, ...]`` and ``response [n, r, ...]`` -> ``[n, p + r, ...]`` (inverse of :meth:`split`)."""
        return torch.cat([self.expand(prompt.to(response.device)), response], dim=1)

    def split_positions(self, positions: slice) -> tuple[slice, slice]:
        """A slice ``positions`` of the ``[n, P + R]`` columns as its parts in the prompt forward's ``P``
        columns and the response forward's ``R`` columns. ``start`` counts from the left (0 or more),
        ``stop`` from the right (negative) or is None, as the positions predicting the response
        (``slice(P - 1, -1)``) do: both then hold whatever ``R`` is."""
        if not isinstance(positions, slice) or positions.step not in (None, 1):
            raise ValueError(f"shared prefix: positions must be a slice with step 1, got {positions!r}")
        start, stop = positions.start or 0, positions.stop
        if start < 0 or (stop is not None and stop > 0):
            raise ValueError(
                f"shared prefix: positions {positions!r} must start at 0 or later and stop at the end"
            )
        p = self.prompt_len
        return slice(min(start, p), p), slice(max(start - p, 0), stop)
