"""RSPO's router-shift weight for one micro-batch (Wang et al., arXiv 2510.23027 v2), and its ``rspo/`` statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_moe_rl.algorithms import Algorithm
from lit_moe_rl.batch import Rollout
from lit_moe_rl.learner.stats import Gathered, Stats
from lit_moe_rl.metrics import routing_agreement
from lit_moe_rl.routing.record import RouterLogitsCapture, gather_router_logp
from lit_moe_rl.routing.shift import RouterShift, router_shift


def router_shift_weight(
    algorithm: Algorithm, micro: Rollout, capture: RouterLogitsCapture | None, stats: Stats
) -> Tensor | None:
    """RSPO's ``log γ̃`` ``[n, R]`` (None unless ``algorithm`` weights by it); its statistics into ``stats``.

    ``γ`` compares the current router log-probs with the old ones at the old top-K experts
    (:func:`lit_moe_rl.routing.shift.router_shift`); it is floored and detached.
    """
    if capture is None:
        return None
    old_ids = micro.require("old_topk", "router-shift tracking in the old pass")
    device = capture.router_logp.device
    current = gather_router_logp(capture.router_logp, old_ids.to(device))  # [n, R, L, K]
    mask = micro.response_mask.to(device)
    shift = router_shift(
        current,
        micro.old_router_logp.to(device),
        mask,
        floor=algorithm.router_shift_floor,
        layer_reduce=algorithm.router_shift_layer_reduce,
    )
    add_shift_stats(stats, shift, mask, algorithm.router_shift_floor)
    changed = routing_agreement(old_ids.to(device), capture.topk, mask)
    compared = float(changed["tokens"])
    stats.mean("rspo/topk_changed_router_frac", changed["router_disagreement"], compared, "token_mean")
    stats.mean("rspo/topk_changed_token_frac", changed["token_disagreement"], compared, "token_mean")
    return shift.gamma.log() if algorithm.router_shift else None


def add_shift_stats(stats: Stats, shift: RouterShift, mask: Tensor, floor: float) -> None:
    """The diagnostics of :func:`lit_moe_rl.routing.shift.shift_stats`, each by its kind: token means
    (``gamma_mean``, ``floor_frac``, ``shift_mean``, ``layer_shift/<l>``), ``gamma_min``, and the
    quantiles of γ̃ and Δ over every token of the step (neutral values, γ 1 and Δ 0, when there is none)."""
    gamma, delta = shift.gamma[mask].float(), shift.delta[mask].float()
    tokens = float(mask.sum())
    stats.mean("rspo/gamma_mean", gamma.sum() / max(tokens, 1.0), tokens, "token_mean")
    stats.mean(
        "rspo/floor_frac",
        (shift.gamma_raw[mask] < floor).float().sum() / max(tokens, 1.0),
        tokens,
        "token_mean",
    )
    stats.mean("rspo/shift_mean", delta.sum() / max(tokens, 1.0), tokens, "token_mean")
    stats.extreme("rspo/gamma_min", gamma.min() if tokens else 1.0, "min", tokens)
    for q, name in ((0.1, "gamma_p10"), (0.5, "gamma_p50")):
        stats.gathered(f"rspo/{name}", Gathered(gamma, "quantile", q, empty=1.0))
    for q, name in ((0.9, "shift_p90"), (0.99, "shift_p99")):
        stats.gathered(f"rspo/{name}", Gathered(delta, "quantile", q, empty=0.0))
    layer_shift = torch.where(mask.unsqueeze(-1), shift.layer_shift, 0.0).sum(dim=(0, 1)) / max(tokens, 1.0)
    for layer, value in enumerate(layer_shift.tolist()):
        stats.mean(f"rspo/layer_shift/{layer}", value, tokens, "token_mean")
