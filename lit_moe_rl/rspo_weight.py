"""RSPO's router-shift weight for one micro-batch (Wang et al., arXiv 2510.23027 v2)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_moe_rl.batch import Rollout
from lit_moe_rl.routing.record import gather_router_logp
from lit_moe_rl.routing.shift import router_shift, shift_stats, topk_set_changed


def router_shift_weight(
    algorithm: Any, micro: Rollout, capture: Any
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """RSPO's ``log γ̃`` ``[n, R]`` (None unless ``algorithm`` weights by it) and its ``rspo/`` stats.

    ``γ`` compares the current router log-probs with the old ones at the old top-K experts
    (:func:`lit_moe_rl.routing.shift.router_shift`); it is floored and detached.
    """
    if capture is None:
        return None, {}
    old_ids = micro.require("old_topk", "router-shift tracking in the old pass")
    device = capture.router_logp.device
    current = gather_router_logp(capture.router_logp, old_ids.to(device))  # [n, R, L, K]
    mask = micro.response_mask
    shift = router_shift(
        current,
        micro.old_router_logp.to(device),
        mask,
        floor=algorithm.router_shift_floor,
        layer_reduce=algorithm.router_shift_layer_reduce,
    )
    stats = shift_stats(shift, mask, algorithm.router_shift_floor)
    layer_shift = stats.pop("layer_shift")
    metrics = {f"rspo/{key}": value for key, value in stats.items()}
    metrics |= {f"rspo/layer_shift/{layer}": value for layer, value in enumerate(layer_shift)}
    changed = topk_set_changed(old_ids.to(device), capture.topk, valid=mask)
    metrics |= {f"rspo/{key}": value for key, value in changed.items()}
    log_weight = shift.gamma.log() if algorithm.router_shift else None
    return log_weight, metrics
