"""A compact store for the routes of one GRPO rollout (R3, arXiv 2510.11370 §4.1).

The rollout engine records ``[N, P + R, L, K]`` expert ids (:mod:`lit_moe_rl.batch` layout), but the
``G`` completions of a prompt share its prefill: their prompt routes are the same ``[P, L, K]``
block G times over. :class:`RouteStore` keeps that block once per group, the response routes
``[N, R, L, K]`` per row, and materialises the full layout only for the rows of one micro-batch
(:meth:`RouteStore.rows`). With ``P`` prompt and ``R`` response positions it holds
``B·P + N·R`` positions instead of ``N·(P + R)``.

Choices made here:

* Identity of the prompt routes across a group is *checked*, never assumed. HF ``generate`` runs
  the G copies of a prompt as separate rows of one batched prefill, so their routes can only differ
  through batch-position-dependent numerics; on CPU (fp32 and bf16) they were identical in every
  run we checked (``tests/test_r3_integration.py``). A group whose copies differ keeps one block per
  row, so the store is always exact.
* The tensors live on CPU (pinned when CUDA is available) and move to the accelerator one
  micro-batch at a time.
* :meth:`select_rows` (called by :meth:`lit_moe_rl.batch.Rollout.select`) returns a view that shares
  the tensors and only keeps a row index, so slicing a rollout copies no routes.
* :meth:`keep_response` (called by :func:`lit_moe_rl.learner.batching.trim_padding`) returns a view
  that materialises only the first ``r`` response positions, so a micro-batch trimmed of its padding
  columns replays the same experts at every position it keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RouteStore", "as_route_tensor", "pack_routes"]


class RouteStore:
    """Routes of a rollout: prompt blocks ``[U, P, L, K]`` shared within groups, response ``[N, R, L, K]``.

    ``prompt_index [N]`` maps each row to its prompt block (``U = B`` when every group's copies agree).
    A view (from :meth:`select_rows`) also holds ``index [n]``: its rows in the underlying store; one
    from :meth:`keep_response` holds ``response_width``: the response positions it materialises.
    """

    def __init__(
        self,
        prompt: Tensor,
        prompt_index: Tensor,
        response: Tensor,
        index: Tensor | None = None,
        response_width: int | None = None,
    ) -> None:
        if prompt.dim() != 4 or response.dim() != 4 or prompt.shape[2:] != response.shape[2:]:
            raise ValueError(
                f"RouteStore: prompt [U, P, L, K] and response [N, R, L, K] must agree on L, K; "
                f"got {tuple(prompt.shape)} and {tuple(response.shape)}"
            )
        if prompt.dtype != response.dtype:
            raise ValueError(f"RouteStore: prompt dtype {prompt.dtype} != response dtype {response.dtype}")
        if prompt_index.shape != (response.shape[0],):
            raise ValueError(
                f"RouteStore: prompt_index has shape {tuple(prompt_index.shape)}, expected ({response.shape[0]},)"
            )
        self.prompt = prompt
        self.prompt_index = prompt_index
        self.response = response
        self.index = index
        self.response_width = response.shape[1] if response_width is None else response_width
        if not 0 <= self.response_width <= response.shape[1]:
            raise ValueError(
                f"RouteStore: response_width {self.response_width} outside [0, {response.shape[1]}]"
            )

    # ------------------------------------------------------------ construction
    @classmethod
    def pack(
        cls, routes: Tensor, prompt_len: int, group_size: int, *, pin_memory: bool | None = None
    ) -> RouteStore:
        """Compact ``routes [N, P + R, L, K]`` whose rows ``[g*G, (g+1)*G)`` share a prompt.

        ``pin_memory=None`` pins when CUDA is available. ``N`` not a multiple of ``group_size`` is
        stored one prompt block per row.
        """
        if routes.dim() != 4:
            raise ValueError(f"RouteStore.pack: routes must be [N, P+R, L, K], got {tuple(routes.shape)}")
        if not 0 <= prompt_len <= routes.shape[1]:
            raise ValueError(f"RouteStore.pack: prompt_len {prompt_len} outside [0, {routes.shape[1]}]")
        routes = routes.detach().cpu()
        num_rows = routes.shape[0]
        group = group_size if group_size >= 1 and num_rows % group_size == 0 else 1
        blocks = routes[:, :prompt_len].reshape(num_rows // group, group, prompt_len, *routes.shape[2:])
        same = (blocks == blocks[:, :1]).flatten(2).all(-1).all(-1)  # [B]: all copies agree
        keep = torch.ones(blocks.shape[:2], dtype=torch.bool)  # [B, G]: rows that get their own block
        keep[:, 1:] = ~same[:, None]
        prompt = blocks[keep].contiguous()  # [U, P, L, K], row-major order
        prompt_index = keep.flatten().long().cumsum(0) - 1  # a shared row points at its group's block
        response = routes[:, prompt_len:].contiguous()
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory:
            prompt, response = prompt.pin_memory(), response.pin_memory()
        return cls(prompt, prompt_index, response)

    # ------------------------------------------------------------ shape
    @property
    def num_rows(self) -> int:
        return len(self.index) if self.index is not None else self.response.shape[0]

    def __len__(self) -> int:
        return self.num_rows

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]

    @property
    def shape(self) -> torch.Size:
        """The shape :meth:`rows` would give for all rows: ``[n, P + R, L, K]`` (``R``: the kept width)."""
        layers, k = self.response.shape[2:]
        return torch.Size((self.num_rows, self.prompt_len + self.response_width, layers, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.response.dtype

    @property
    def shares_prompts(self) -> bool:
        """True when every group's prompt routes were identical (one block per group)."""
        return self.prompt.shape[0] < self.response.shape[0] or self.response.shape[0] == 0

    @property
    def bytes_per_position(self) -> int:
        """``L · K · itemsize``: the bytes of one token's routes."""
        layers, k = self.response.shape[2:]
        return layers * k * self.response.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the underlying store (shared by its views)."""
        return sum(t.numel() * t.element_size() for t in (self.prompt, self.response, self.prompt_index))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the equivalent dense ``[N, P + R, L, K]`` tensor of the underlying store."""
        positions = self.response.shape[0] * (self.prompt.shape[1] + self.response.shape[1])
        return positions * self.bytes_per_position

    # ------------------------------------------------------------ access
    def _base_rows(self, index: Tensor | None) -> Tensor:
        if index is None:
            index = torch.arange(self.num_rows)
        index = torch.as_tensor(index, dtype=torch.long).cpu().reshape(-1)
        return index if self.index is None else self.index[index]

    def select_rows(self, index: Tensor) -> RouteStore:
        """A view of rows ``index`` (of this view); no route is copied."""
        base = self._base_rows(index)
        return RouteStore(self.prompt, self.prompt_index, self.response, base, self.response_width)

    def keep_response(self, width: int) -> RouteStore:
        """A view of the first ``width`` response positions (``[n, P + width, L, K]``); no route is copied.

        What :func:`~lit_moe_rl.learner.batching.trim_padding` does to a micro-batch's ``input_ids``, so
        every position the trimmed forward keeps replays the route it had in the full layout."""
        if not 0 <= width <= self.response_width:
            raise ValueError(f"RouteStore.keep_response: width {width} outside [0, {self.response_width}]")
        return RouteStore(self.prompt, self.prompt_index, self.response, self.index, width)

    def rows(self, index: Tensor | None = None) -> Tensor:
        """Rows ``index`` (default: all rows of this view) as ``[n, P + R, L, K]``, on CPU."""
        base = self._base_rows(index)
        response = self.response[base, : self.response_width]
        return torch.cat([self.prompt[self.prompt_index[base]], response], dim=1)

    def full(self) -> Tensor:
        """Every row of this view, ``[n, P + R, L, K]``."""
        return self.rows()

    def __repr__(self) -> str:
        return (
            f"RouteStore(shape={list(self.shape)}, dtype={self.dtype}, prompt_blocks={self.prompt.shape[0]}, "
            f"nbytes={self.nbytes}, dense_nbytes={self.dense_nbytes})"
        )


def pack_routes(routes: Tensor | None, prompt_len: int, group_size: int) -> RouteStore | None:
    """:meth:`RouteStore.pack` for an engine's optional routes (None when it recorded none)."""
    return None if routes is None else RouteStore.pack(routes, prompt_len, group_size)


def as_route_tensor(routes: Tensor | RouteStore) -> Tensor:
    """``routes`` as a dense ``[n, P + R, L, K]`` tensor (a store materialises its rows)."""
    return routes.rows() if isinstance(routes, RouteStore) else routes
