"""Replay recorded routes in a training forward: R3, rollout routing replay.

Ma et al., arXiv 2510.11370 §4.1: the training forward uses the expert ids the inference engine
picked, ``I_infer``, with gates from the LIVE training router restricted to them
(``g_i = I_i exp(s_i) / sum_j I_j exp(s_j)`` for a renormalising softmax router; each family's own
gating otherwise, see :mod:`lit_moe_rl.routing.adapters`). The router still gets gradients through
the gate weights; only the replayed experts run. Shared experts live outside the router and are
untouched. Choices made here:

* A forward hook on each router (prepended, so other routing hooks see what the experts consume)
  replaces its output ``(logits, weights, indices)`` by ``(logits, gate_weights(logits, ids), ids)``.
  Bound to one model and one micro-batch; hooks are removed on exit; no global state.
* Positions whose routes are all -1 keep the native ``(weights, indices)`` (fall back to native
  routing), e.g. padding and the last sampled token; a partly -1 position is an error.
* Each router must consume its routes exactly once per model forward (as slime checks); the routes
  are the same for every forward inside the block. Activation-checkpointing recomputes during
  backward (detected as "autograd is running a backward pass") replay the same routes and do not
  count. With checkpointing on, call ``backward()`` inside the block: after exit the recompute
  would route natively, so exiting without it after a grad-enabled forward is an error.
* Micro-batching: one block per micro-batch, with the routes sliced like its ``input_ids``.
* The router logits are returned unchanged, so an HF load-balancing aux loss
  (``output_router_logits=True``) recomputes the *native* top-K from them; R3 trained without one
  (docs/algorithms.md §3.6 pitfall 6): keep it off.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lit_moe_rl.routing.adapters import (
    MoERouter,
    call_shape,
    in_backward_recompute,
    route_dtype,
    track_block_shapes,
)
from lit_moe_rl.routing.checks import require_moe, validate_routes

if TYPE_CHECKING:
    from lit_moe_rl.learner.prefix import SharedPrefix

__all__ = ["RouteReplayer", "replay_routes"]


_CHECKPOINTABLE: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref]] = weakref.WeakKeyDictionary()


def checkpointing_active(model: nn.Module) -> bool:
    """Whether any module of ``model`` recomputes its forward in the backward (HF gradient checkpointing,
    which applies in training mode only).

    Asked several times per micro-batch, so the modules that have a ``gradient_checkpointing`` flag are
    found once per model (transformers turns it on and off only on modules that have it), not by a walk
    over every module each time."""
    if (modules := _CHECKPOINTABLE.get(model)) is None:  # weak references: the model may be one of them
        modules = [weakref.ref(m) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        _CHECKPOINTABLE[model] = modules
    return any(
        (m := ref()) is not None and m.gradient_checkpointing is True and m.training for ref in modules
    )


class RouteReplayer:
    """State of one :func:`replay_routes` block: consumption counts, fallbacks, native routes.

    With a :class:`~lit_moe_rl.learner.prefix.SharedPrefix` a model forward is two decoder calls (the
    distinct prompts, then the responses on their KV cache): a router's calls alternate between the
    prompt routes ``[U, P]`` and the response routes ``[n, R]`` split from ``routes``, and the native
    routes are joined back into the ``[n, P + R]`` layout."""

    def __init__(
        self,
        routers: list[MoERouter],
        routes: torch.Tensor,
        keep_native: bool,
        prefix: SharedPrefix | None = None,
    ) -> None:
        self._routers = routers
        self._prefix = prefix
        self._segments = list(prefix.split(routes)) if prefix is not None else [routes]
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._block_shapes: dict[int, tuple[int, int]] = {}
        self._native: list[list[torch.Tensor | None]] = (
            [[None] * len(self._segments) for _ in routers] if keep_native else []
        )
        self._dtype = route_dtype(routers[0].num_experts)
        self.consumed = [0] * len(routers)
        """Forward calls per router (MoE-layer order), backward recomputes excluded."""
        self.forwards = 0
        """Model forwards run inside the block (recomputes excluded)."""
        self.recomputes = 0
        """Router calls made by activation-checkpointing recompute during backward."""
        self.fallback_tokens = int((routes[..., 0] < 0).any(-1).sum())
        """Positions of the ``B x S`` whose routes are -1 in some layer: native routing there."""
        self.expects_recompute = False

    def _segment(self, router: MoERouter) -> int:
        """Which of the routes this call of ``router`` replays (its forward calls so far, cyclically)."""
        return self.consumed[router.layer] % len(self._segments)

    def _layer_routes(self, layer: int, segment: int, device: torch.device) -> torch.Tensor:
        if (segment, device) not in self._on_device:
            routes = self._segments[segment]
            flat = routes.reshape(routes.shape[0] * routes.shape[1], *routes.shape[2:])
            self._on_device[segment, device] = flat.to(device, non_blocking=True)
        return self._on_device[segment, device][:, layer].long()

    def _check_call(self, router: MoERouter, router_input: torch.Tensor, n_tok: int, segment: int) -> None:
        batch, seq = self._segments[segment].shape[:2]
        expected = batch * seq
        if n_tok != expected:
            hint = "" if self._prefix is not None else (
                " (a forward that runs shared prompts once, model.shared_prefix, needs prefix=micro.shared_prefix)"
            )  # fmt: skip
            raise RuntimeError(
                f"replay_routes: router {router.name} (layer {router.layer}) saw {n_tok} tokens, "
                f"routes cover B*S = {batch}*{seq} = {expected}{hint}"
            )
        shape = call_shape(router, router_input, self._block_shapes)
        if shape is not None and shape != (batch, seq):
            raise RuntimeError(
                f"replay_routes: router {router.name} (layer {router.layer}) saw a [B, S] = {list(shape)} "
                f"batch, routes are [{batch}, {seq}]"
            )

    def _replace(self, router: MoERouter, output, segment: int):
        logits, weights, native_idx = output
        routes = self._layer_routes(router.layer, segment, native_idx.device)
        valid = routes[:, 0] >= 0
        replay_idx = torch.where(valid[:, None], routes, native_idx).to(native_idx.dtype)
        replay_w = router.adapter.gate_weights(router.module, logits, replay_idx).to(weights.dtype)
        replay_w = torch.where(valid[:, None], replay_w, weights)
        return logits, replay_w, replay_idx

    def router_hook(self, router: MoERouter):
        def on_forward(module, args, output):
            segment = self._segment(router)
            if in_backward_recompute():
                self.recomputes += 1
            else:
                self._check_call(router, args[0], output[0].shape[0], segment)
                self.consumed[router.layer] += 1
                if self._native:
                    batch, seq = self._segments[segment].shape[:2]
                    native = output[2].detach().reshape(batch, seq, -1)
                    self._native[router.layer][segment] = native.to(self._dtype)
            return self._replace(router, output, segment)

        return on_forward

    def model_pre_hook(self, model: nn.Module):
        checkpointing = checkpointing_active(model)

        def on_forward(_module, _args):
            if not in_backward_recompute():
                self.forwards += 1
                self.expects_recompute |= checkpointing and torch.is_grad_enabled()

        return on_forward

    @property
    def native_routes(self) -> torch.Tensor:
        """The routers' own top-K for the same positions in the last forward, ``[B, S, L, K]``
        (route_dtype, on the routers' device): compare with the replayed routes for free."""
        if not self._native:
            raise RuntimeError("replay_routes: native routes were not kept (keep_native=False)")
        if any(n is None for calls in self._native for n in calls):
            raise RuntimeError("replay_routes: native routes are unknown until every router has run")
        device = self._native[0][0].device
        layers = [calls[0] if self._prefix is None else self._prefix.join(*calls) for calls in self._native]
        return torch.stack([n.to(device) for n in layers], dim=2)

    def check_consumed(self) -> None:
        """Every router consumed its routes exactly once per forward; backward ran if it must."""
        expected = self.forwards or max(max(self.consumed), 1)
        for router, count in zip(self._routers, self.consumed, strict=True):
            if count != expected:
                raise RuntimeError(
                    f"replay_routes: router {router.name} consumed routes {count} times, expected {expected}"
                )
        if self.expects_recompute and self.recomputes == 0:
            raise RuntimeError(
                "replay_routes: gradient checkpointing is on and backward() did not run inside the block; "
                "its recompute would route natively. Call backward() inside `with replay_routes(...)`"
            )


@contextmanager
def replay_routes(
    model: nn.Module,
    routes: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    keep_native: bool = True,
    validate: bool = True,
    routers: list[MoERouter] | None = None,
    prefix: SharedPrefix | None = None,
) -> Iterator[RouteReplayer]:
    """Force the experts of every forward in the block onto ``routes [B, S, L, K]`` (R3).

    ``routes``: any int dtype, any device (moved to each router's device once), aligned with the
    ``input_ids [B, S]`` of the forward(s) in the block; -1 rows fall back to native routing.
    Validated first (:func:`~lit_moe_rl.routing.checks.validate_routes`; pass ``input_ids`` to check
    the token alignment up front, otherwise it is checked per router call). On a clean exit, checks
    that every router consumed the routes once per forward. A caller that replays the same, already
    validated routes many times (every update of a rollout) passes ``validate=False`` and the
    ``routers`` it found once, so each block only installs hooks. ``prefix``: the forwards run the
    rows' shared prompts once (:mod:`lit_moe_rl.learner.prefix`); ``routes`` keep the ``[B, S]`` layout.
    """
    routers = routers if routers is not None else require_moe(model, "replay_routes")
    if validate:
        validate_routes(
            routes,
            num_layers=len(routers),
            top_k=routers[0].top_k,
            num_experts=routers[0].num_experts,
            seq_shape=None if input_ids is None else input_ids.shape,
        )
    replayer = RouteReplayer(routers, routes, keep_native, prefix)
    handles = track_block_shapes(routers, replayer._block_shapes)
    handles.append(model.register_forward_pre_hook(replayer.model_pre_hook(model)))
    handles += [r.module.register_forward_hook(replayer.router_hook(r), prepend=True) for r in routers]
    try:
        yield replayer
    finally:
        for handle in handles:
            handle.remove()
    replayer.check_consumed()
