"""RSPO router-shift ratio (Zhang et al., "Towards Stable and Effective RL for MoE", arXiv 2510.23027).

Implements the v2 reading of docs/algorithms.md §4.2 (Eq. 5-9, 11 as cited by a 3rd-party implementation):
for each response token and MoE layer l, with the K experts the OLD policy activated,

    d_l   = (1/K) sum_k |log r_phi(e_k) - log r_phi_old(e_k)|
    Delta = (1/L) sum_l d_l            (layer_reduce="mean", the paper)
    gamma = exp(-Delta) in (0, 1]
    gamma~ = sg[max(gamma, gamma_min)]

where ``log r`` is the router log-softmax over all experts, gathered at the old top-K ids. The
caller adds ``log gamma~`` to the log-ratio before clipping (docs/algorithms.md §4.3, v2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lit_moe_rl.metrics import routing_agreement

_LAYER_REDUCE = ("mean", "sum")


class RouterShift(NamedTuple):
    """Router-shift quantities, all detached float32; masked positions hold neutral values.

    - ``gamma``: ``[B, T]`` floored ratio ``max(exp(-Delta), floor)`` (the weight to use), 1 when masked.
    - ``gamma_raw``: ``[B, T]`` unfloored ``exp(-Delta)``, 1 when masked.
    - ``delta``: ``[B, T]`` aggregate shift ``Delta``, 0 when masked.
    - ``layer_shift``: ``[B, T, L]`` per-layer deviation ``d_l``, 0 when masked.
    """

    gamma: Tensor
    gamma_raw: Tensor
    delta: Tensor
    layer_shift: Tensor


def _check_inputs(
    router_logp: Tensor, old_router_logp: Tensor, mask: Tensor | None, floor: float, layer_reduce: str
) -> None:
    if router_logp.shape != old_router_logp.shape or router_logp.dim() != 4:
        raise ValueError(
            "router_shift: router_logp and old_router_logp must both be [B, T, L, K], got "
            f"{tuple(router_logp.shape)} and {tuple(old_router_logp.shape)}"
        )
    if mask is not None and mask.shape != router_logp.shape[:2]:
        raise ValueError(
            f"router_shift: mask has shape {tuple(mask.shape)}, expected {tuple(router_logp.shape[:2])}"
        )
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"router_shift: floor must be in [0, 1], got {floor}")
    if layer_reduce not in _LAYER_REDUCE:
        raise ValueError(f"router_shift: layer_reduce must be one of {_LAYER_REDUCE}, got {layer_reduce!r}")


def router_shift(
    router_logp: Tensor,
    old_router_logp: Tensor,
    mask: Tensor | None = None,
    *,
    floor: float = 0.8,
    layer_reduce: str = "mean",
) -> RouterShift:
    """RSPO router shift, arXiv 2510.23027 (v2) Eq. 5-9 / docs/algorithms.md §4.2, returning every intermediate.

    ``router_logp`` (current policy) and ``old_router_logp`` (theta_old): ``[B, T, L, K]`` router
    log-probabilities (log-softmax over all experts) gathered at the OLD policy's top-K experts;
    ``mask``: bool ``[B, T]`` (None = all valid). Choices:

    - ``layer_reduce="mean"`` is the paper's ``Delta = mean_l d_l``; ``"sum"`` is what a 3rd-party verl
      fork uses (``gamma = prod_l exp(-d_l)``), which damps far harder for deep models.
    - ``floor`` = gamma_min in [0, 1]; 0 disables the floor (gamma > 0 anyway). The default 0.8 is
      that of an unattributed 3rd-party implementation (docs/algorithms.md §8).
    - Everything is computed in float32 under ``no_grad``: gamma is a stop-gradient weight (the v1
      ablation reports collapse without it). Masked positions get gamma = 1 and never read garbage.
    """
    _check_inputs(router_logp, old_router_logp, mask, floor, layer_reduce)
    with torch.no_grad():
        d_layer = (router_logp.detach().float() - old_router_logp.detach().float()).abs().mean(dim=-1)
        if mask is not None:
            d_layer = torch.where(mask.unsqueeze(-1), d_layer, 0.0)
        delta = d_layer.mean(dim=-1) if layer_reduce == "mean" else d_layer.sum(dim=-1)
        gamma_raw = torch.exp(-delta)
        gamma = gamma_raw.clamp(min=floor)
    return RouterShift(gamma=gamma, gamma_raw=gamma_raw, delta=delta, layer_shift=d_layer)


def router_shift_ratio(
    router_logp: Tensor,
    old_router_logp: Tensor,
    mask: Tensor | None = None,
    *,
    floor: float = 0.8,
    layer_reduce: str = "mean",
    return_layer_shift: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The floored, detached RSPO weight gamma~ ``[B, T]`` (see :func:`router_shift`).

    With ``return_layer_shift`` returns ``(gamma, d_layer)`` with ``d_layer`` ``[B, T, L]``.
    """
    shift = router_shift(router_logp, old_router_logp, mask, floor=floor, layer_reduce=layer_reduce)
    return (shift.gamma, shift.layer_shift) if return_layer_shift else shift.gamma


def shift_stats(shift: RouterShift, mask: Tensor | None, floor: float) -> dict[str, Tensor]:
    """Router-side RSPO diagnostics (docs/algorithms.md §4.5) over the valid tokens, all detached float32.

    ``gamma_mean``/``gamma_p10``/``gamma_p50``/``gamma_min``: of the floored gamma~ actually used;
    ``floor_frac``: fraction of tokens with raw gamma < ``floor`` (strict, so 0 when floor=0);
    ``shift_mean``/``shift_p90``/``shift_p99``: of Delta; ``layer_shift``: ``[L]`` mean d_l per layer.
    Quantiles use ``torch.quantile`` (linear interpolation). With no valid token the values are the
    neutral ones: gamma statistics 1, the others 0.
    """
    if mask is None:
        mask = torch.ones(shift.gamma.shape, dtype=torch.bool, device=shift.gamma.device)
    gamma, delta = shift.gamma[mask], shift.delta[mask]
    count = mask.sum().clamp(min=1)
    layer_shift = torch.where(mask.unsqueeze(-1), shift.layer_shift, 0.0).sum(dim=(0, 1)) / count
    if gamma.numel() == 0:
        one = torch.ones((), dtype=torch.float32, device=mask.device)
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        stats = {"gamma_mean": one, "gamma_p10": one, "gamma_p50": one, "gamma_min": one, "floor_frac": zero}
        return {**stats, "shift_mean": zero, "shift_p90": zero, "shift_p99": zero, "layer_shift": layer_shift}
    # q in the input's dtype: under `precision: bf16-true` Lightning makes bf16 the default dtype
    g_q = torch.quantile(gamma, torch.tensor([0.1, 0.5], dtype=gamma.dtype, device=gamma.device))
    d_q = torch.quantile(delta, torch.tensor([0.9, 0.99], dtype=delta.dtype, device=delta.device))
    return {
        "gamma_mean": gamma.mean(),
        "gamma_p10": g_q[0],
        "gamma_p50": g_q[1],
        "gamma_min": gamma.min(),
        "floor_frac": (shift.gamma_raw[mask] < floor).float().mean(),
        "shift_mean": delta.mean(),
        "shift_p90": d_q[0],
        "shift_p99": d_q[1],
        "layer_shift": layer_shift,
    }


def topk_set_changed(old_ids: Tensor, new_ids: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Fraction of routers / tokens whose top-K expert set changed between theta_old and theta.

    ``old_ids``/``new_ids``: integer ``[B, T, L, K]`` (-1 = no route, excluded); ``valid`` bool
    ``[B, T]``. Sets are compared order-insensitively via :func:`lit_moe_rl.metrics.routing_agreement`:
    ``topk_changed_router_frac`` per (token, layer), ``topk_changed_token_frac`` per token (>= 1 layer
    changed). RSPO's gamma only sees the old experts, so this complements it (docs/algorithms.md §4.2, §4.5).
    """
    agreement = routing_agreement(old_ids, new_ids, valid)
    return {
        "topk_changed_router_frac": agreement["router_disagreement"],
        "topk_changed_token_frac": agreement["token_disagreement"],
    }
