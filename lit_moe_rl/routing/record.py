"""Record the routes an MoE model actually used, and capture router log-probabilities.

R3 (rollout routing replay, Ma et al., arXiv 2510.11370 §4.1): at rollout time, for every token fed
forward (prompt and response) and every MoE layer, keep the top-K expert ids the router returned;
the trainer later replays them (:mod:`lit_moe_rl.routing.replay`). Choices made here:

* Forward hooks on each router (removed on exit; no global state, no monkeypatching) read the
  indices the router RETURNED. A forward pre-hook on the router's MoE block reads the ``(B, S)`` of
  the 3-D hidden states, because routers see them flattened row-major ``(batch, seq)``.
* Calls during a backward pass are activation-checkpointing recomputes and are skipped.
* Routes are stored as the smallest signed int that holds ``-1`` (int8 up to 128 experts).
* With ``generate(num_return_sequences=G)`` HF expands each prompt G times *before* prefill, so the
  recorded batch is ``B*G`` rows in generate's output order. Beam search (which reorders the batch
  between steps) is not supported. A loop that changes the batch between calls (the rollout
  engine's own decode loop drops finished rows) reads each call's routes with
  :meth:`RouteRecorder.take`.

:func:`capture_router_logits` is what RSPO (docs/algorithms.md §4.4) stores: detached per-expert router
log-probs and the top-K ids the experts consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_moe_rl.routing.adapters import (
    MoERouter,
    call_shape,
    in_backward_recompute,
    route_dtype,
    track_block_shapes,
)
from lit_moe_rl.routing.checks import require_moe

if TYPE_CHECKING:
    from lit_moe_rl.learner.prefix import SharedPrefix

__all__ = [
    "RouteRecorder",
    "RouterLogitsCapture",
    "align_generation_routes",
    "capture_router_logits",
    "gather_router_logp",
    "record_routes",
]


class _PerCallHooks:
    """Shared bookkeeping: per-layer lists of per-call tensors and the ``(B, S)`` of each call.

    With a :class:`~lit_moe_rl.learner.prefix.SharedPrefix` each model forward is two calls per router,
    the distinct prompts ``[U, P]`` then the responses ``[n, R]``; they are joined into the ``[n, P + R]``
    layout of one forward."""

    _what = "routing"

    def __init__(self, routers: list[MoERouter], prefix: SharedPrefix | None = None) -> None:
        self._routers = routers
        self._prefix = prefix
        self._block_shapes: dict[int, tuple[int, int]] = {}
        self._per_layer: list[list[torch.Tensor]] = [[] for _ in routers]
        self._batch: int | None = None

    def _call_shape(self, router: MoERouter, router_input: torch.Tensor, n_tok: int) -> tuple[int, int]:
        shape = call_shape(router, router_input, self._block_shapes)
        if shape is None and self._batch is not None and n_tok % self._batch == 0:
            shape = (self._batch, n_tok // self._batch)
        if shape is None or shape[0] * shape[1] != n_tok:
            raise RuntimeError(
                f"{self._what}: cannot tell the (batch, seq) shape of router {router.name}'s call "
                f"({n_tok} tokens); its MoE block does not receive 3-D hidden states"
            )
        if self._prefix is None and self._batch is not None and shape[0] != self._batch:
            raise RuntimeError(
                f"{self._what}: batch size changed from {self._batch} to {shape[0]} between calls "
                "(beam search and batch-shrinking generation are not supported)"
            )
        self._batch = shape[0]
        return shape

    @property
    def calls(self) -> int:
        """Forward calls recorded so far (per router; backward recomputes excluded)."""
        return max(len(c) for c in self._per_layer)

    def _stacked(self, calls: list[list[torch.Tensor]], time_dim: int) -> torch.Tensor:
        """Per-layer lists of per-call tensors -> one tensor, calls along ``time_dim``, layers after it."""
        counts = [len(c) for c in calls]
        if max(counts) == 0:
            raise RuntimeError(f"{self._what}: no forward ran inside the block")
        if min(counts) != max(counts):
            raise RuntimeError(f"{self._what}: routers were called unequal numbers of times {counts}")
        if self._prefix is not None:
            if counts[0] != 2 or time_dim != 1:
                raise RuntimeError(
                    f"{self._what}: a shared-prompt forward is 2 calls per router, got {counts[0]}"
                )
            per_layer = [self._prefix.join(*c) for c in calls]
        else:
            per_layer = [torch.cat(c, dim=time_dim) for c in calls]
        device = per_layer[0].device
        return torch.stack([t.to(device) for t in per_layer], dim=time_dim + 1)


class RouteRecorder(_PerCallHooks):
    """Collects ``[B, S_call, K]`` routed ids per router per forward call (prefill, decode steps)."""

    _what = "record_routes"

    def __init__(self, routers: list[MoERouter], prefix: SharedPrefix | None = None) -> None:
        super().__init__(routers, prefix)
        self._dtype = route_dtype(routers[0].num_experts)

    def hook(self, router: MoERouter):
        def on_forward(_module, args, output):
            if in_backward_recompute():
                return
            indices = output[2]
            batch, seq = self._call_shape(router, args[0], indices.shape[0])
            self._per_layer[router.layer].append(indices.detach().reshape(batch, seq, -1).to(self._dtype))

        return on_forward

    @property
    def routes(self) -> torch.Tensor:
        """``[B, S_total, L, K]`` ids (route_dtype), calls concatenated along time, on the routers' device."""
        return self._stacked(self._per_layer, time_dim=1)

    def take(self) -> torch.Tensor:
        """The routes of the calls since the last ``take`` (``[B, S, L, K]``), then forget them: the next
        call may have another batch size (a decode loop whose finished rows leave the batch)."""
        routes = self.routes
        self._per_layer = [[] for _ in self._routers]
        self._batch = None
        return routes


@contextmanager
def _router_hooks(routers: list[MoERouter], state: _PerCallHooks) -> Iterator[None]:
    """Install ``state``'s forward hook on every router (and the block-shape pre-hooks) for the block."""
    handles = track_block_shapes(routers, state._block_shapes)
    handles += [r.module.register_forward_hook(state.hook(r)) for r in routers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_routes(model: nn.Module, prefix: SharedPrefix | None = None) -> Iterator[RouteRecorder]:
    """``with record_routes(model) as rec: model.generate(...)``; then ``rec.routes`` is
    ``[B, P + steps, L, K]``: the prefill ``[B, P]`` then one position per KV-cache decode step.
    Feed it to :func:`align_generation_routes` to get the training layout. ``prefix``: one training
    forward that runs shared prompts once (:mod:`lit_moe_rl.learner.prefix`); ``routes`` is ``[n, P + R]``."""
    routers = require_moe(model, "record_routes")
    recorder = RouteRecorder(routers, prefix)
    with _router_hooks(routers, recorder):
        yield recorder


def align_generation_routes(
    routes: torch.Tensor, attention_mask: torch.Tensor, num_positions: int
) -> torch.Tensor:
    """Map recorded generation routes ``[B, S_rec, L, K]`` onto the training layout ``[B, N, L, K]``.

    The training ``input_ids`` are generate's output (prompt left-padded, response right-padded),
    ``N = num_positions = P + R``. A position gets -1 ("no route": replay falls back to native
    routing) where ``attention_mask`` is 0 (left padding; pad after EOS, which HF generate keeps
    feeding forward for finished rows), at the last position (the last sampled token is never fed
    forward), and beyond what was recorded (generation stopped early).
    """
    batch, recorded = routes.shape[:2]
    if tuple(attention_mask.shape) != (batch, num_positions):
        raise ValueError(
            f"align_generation_routes: attention_mask has shape {tuple(attention_mask.shape)}, "
            f"expected (B, num_positions) = ({batch}, {num_positions})"
        )
    if recorded > num_positions:
        raise ValueError(
            f"align_generation_routes: {recorded} recorded positions exceed num_positions={num_positions}"
        )
    aligned = routes.new_full((batch, num_positions, *routes.shape[2:]), -1)
    aligned[:, :recorded] = routes
    aligned[:, num_positions - 1] = -1
    aligned[attention_mask.to(aligned.device) == 0] = -1
    return aligned


class RouterLogitsCapture(_PerCallHooks):
    """Detached per-expert router log-probs (float32) and the consumed top-K ids, per router."""

    _what = "capture_router_logits"

    def __init__(
        self, routers: list[MoERouter], positions, kind: str, prefix: SharedPrefix | None = None
    ) -> None:
        super().__init__(routers, prefix)
        self._positions = positions
        self._split = None if prefix is None else prefix.split_positions(positions)
        self._kind = kind
        self._dtype = route_dtype(routers[0].num_experts)
        self._topk: list[list[torch.Tensor]] = [[] for _ in routers]

    def _select(self, rows: torch.Tensor, call: int) -> torch.Tensor:
        """``rows [B, S, X]`` -> kept positions: ``[N, X]`` for a bool mask, ``[B, S', X]`` for an index
        (under a shared prefix, the part of the slice in this call's prompt or response columns)."""
        if self._split is not None:
            return rows[:, self._split[call % 2]]
        if self._positions is None:
            return rows
        positions = self._positions
        if isinstance(positions, torch.Tensor):
            positions = positions.to(rows.device)
            if positions.dtype == torch.bool:
                return rows[positions]
        return rows[:, positions]

    def hook(self, router: MoERouter):
        def on_forward(_module, args, output):
            if in_backward_recompute():
                return
            logits, indices = output[0], output[2]
            batch, seq = self._call_shape(router, args[0], logits.shape[0])
            call = len(self._per_layer[router.layer])
            kept = self._select(logits.detach().reshape(batch, seq, -1), call)
            kept = kept.float()
            logp = F.log_softmax(kept, dim=-1) if self._kind == "log_softmax" else F.logsigmoid(kept)
            self._per_layer[router.layer].append(logp)
            topk = indices.detach().reshape(batch, seq, -1).to(self._dtype)
            self._topk[router.layer].append(self._select(topk, call))

        return on_forward

    def _time_dim(self) -> int:
        is_mask = isinstance(self._positions, torch.Tensor) and self._positions.dtype == torch.bool
        return 0 if is_mask else 1

    @property
    def router_logp(self) -> torch.Tensor:
        """``[B, S, L, E]`` float32 (``[N, L, E]`` for a bool ``positions`` mask; ``[B, S', L, E]`` for
        an index); several calls are concatenated along time (rows for a mask)."""
        return self._stacked(self._per_layer, self._time_dim())

    @property
    def topk(self) -> torch.Tensor:
        """Top-K ids the experts consumed, ``[B, S, L, K]`` (route_dtype), selected like ``router_logp``."""
        return self._stacked(self._topk, self._time_dim())


@contextmanager
def capture_router_logits(
    model: nn.Module,
    positions: torch.Tensor | slice | None = None,
    kind: Literal["log_softmax", "log_sigmoid"] = "log_softmax",
    prefix: SharedPrefix | None = None,
) -> Iterator[RouterLogitsCapture]:
    """Keep each router's detached log-probs over all experts and its top-K ids (RSPO, §4.4).

    ``positions``: None (all), a bool ``[B, S]`` mask (e.g. the positions that predict response
    tokens) or a sequence index/slice; only those rows are kept, to save memory. ``prefix``: the forward
    runs shared prompts once (:mod:`lit_moe_rl.learner.prefix`); ``positions`` is then a slice of the
    ``[n, P + R]`` layout, and the result is in that layout too.
    ``kind="log_softmax"`` is the RSPO "router probability" (defined for softmax routers, as the
    third-party implementations do); it is also the default for DeepSeek-V3's sigmoid router, where
    ``"log_sigmoid"`` gives the per-expert sigmoid score instead. Hooks here run after
    :func:`~lit_moe_rl.routing.replay.replay_routes`'s, so inside a replay the ids are the replayed ones.
    """
    if kind not in ("log_softmax", "log_sigmoid"):
        raise ValueError(f"capture_router_logits: kind must be 'log_softmax' or 'log_sigmoid', got {kind!r}")
    routers = require_moe(model, "capture_router_logits")
    capture = RouterLogitsCapture(routers, positions, kind, prefix)
    with _router_hooks(routers, capture):
        yield capture


def gather_router_logp(router_logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``router_logp [..., L, E]`` at ``ids [..., L, K]`` -> ``[..., L, K]``; -1 ids give 0.0 (mask them)."""
    ids = ids.to(router_logp.device)
    gathered = router_logp.gather(-1, ids.long().clamp(min=0))
    return gathered.masked_fill(ids < 0, 0.0)
