"""Loud checks at the routing edges (R3, arXiv 2510.11370 §4.1; docs/algorithms.md §3.6 pitfall 3).

A route tensor is ``[B, S, L, K]`` integer expert ids, ``-1`` where a position has no route
(padding, the last sampled token). Every error names the failed check and, where it applies, the
MoE layer, e.g. ``routes: expert id 9 out of range [0, 8) at layer 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_moe_rl.routing.adapters import MoERouter, find_moe_routers

__all__ = ["require_moe", "validate_routes"]


def require_moe(model: nn.Module, feature: str) -> list[MoERouter]:
    """The model's routers; ValueError if it has none (R3/RSPO on a dense model is a config error)."""
    routers = find_moe_routers(model)
    if not routers:
        raise ValueError(f"{feature}: model has no MoE layer (found no router module)")
    return routers


def _check_shape(routes: torch.Tensor, num_layers: int, top_k: int, seq_shape) -> None:
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise ValueError(f"routes: dtype {routes.dtype} is not an integer type")
    if routes.dim() != 4:
        raise ValueError(f"routes: expected 4 dims [B, S, L, K], got shape {tuple(routes.shape)}")
    if routes.shape[2] != num_layers:
        raise ValueError(f"routes: {routes.shape[2]} MoE layers in routes, model has {num_layers}")
    if routes.shape[3] != top_k:
        raise ValueError(f"routes: top-k {routes.shape[3]} in routes, model routes top-{top_k}")
    if seq_shape is not None and tuple(routes.shape[:2]) != tuple(seq_shape):
        raise ValueError(
            f"routes: token alignment: routes cover [B, S] = {list(routes.shape[:2])}, "
            f"input_ids is {list(seq_shape)}"
        )


def _first_bad_layer(bad: torch.Tensor) -> int | None:
    """First layer index with any True in ``bad [B, S, L, ...]``."""
    per_layer = bad.movedim(2, 0).reshape(bad.shape[2], -1).any(-1)
    hits = per_layer.nonzero()
    return int(hits[0, 0]) if len(hits) else None


def _check_values(routes: torch.Tensor, num_experts: int) -> None:
    bad = (routes < -1) | (routes >= num_experts)
    if (layer := _first_bad_layer(bad)) is not None:
        expert = int(routes[:, :, layer][bad[:, :, layer]][0])
        raise ValueError(f"routes: expert id {expert} out of range [0, {num_experts}) at layer {layer}")
    missing = routes == -1
    partial = missing.any(-1) & ~missing.all(-1)
    if (layer := _first_bad_layer(partial)) is not None:
        b, s = (int(i) for i in partial[:, :, layer].nonzero()[0])
        raise ValueError(
            f"routes: partial route (some but not all K ids are -1) at layer {layer}, "
            f"batch {b}, position {s}; a position has all K routes or none"
        )


def _check_duplicates(routes: torch.Tensor) -> None:
    ids = routes.sort(dim=-1).values
    dup = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)
    if (layer := _first_bad_layer(dup)) is not None:
        b, s, k = (int(i) for i in dup[:, :, layer].nonzero()[0])
        raise ValueError(
            f"routes: duplicate expert id {int(ids[b, s, layer, k + 1])} within a token at layer {layer} "
            f"(batch {b}, position {s})"
        )


def _check_empty_layers(routes: torch.Tensor) -> None:
    has_route = (routes[..., 0] >= 0).any(0).any(0)  # [L]
    if has_route.any() and not has_route.all():
        layer = int((~has_route).nonzero()[0, 0])
        raise ValueError(f"routes: layer {layer} has no valid route while other layers do")


def validate_routes(
    routes: torch.Tensor,
    *,
    num_layers: int,
    top_k: int,
    num_experts: int,
    seq_shape: tuple[int, int] | torch.Size | None = None,
) -> None:
    """Check ``routes [B, S, L, K]`` against the model; ValueError naming the check and the layer.

    Checks, in order: integer dtype; 4 dims; ``L == num_layers``; ``K == top_k``; ``[B, S] ==
    seq_shape`` (when given, e.g. ``input_ids.shape``); ids in ``[-1, E)``; a position has all K ids
    or all -1; no duplicate id within a token; no layer without any valid route while others have some.
    """
    _check_shape(routes, num_layers, top_k, seq_shape)
    if routes.numel() == 0:
        return
    _check_values(routes, num_experts)
    _check_duplicates(routes)
    _check_empty_layers(routes)
