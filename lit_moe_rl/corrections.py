"""Off-policy corrections for the train/inference gap, all acting on ``rho = pi_old / mu``.

``old_logp`` is the training engine's log-prob of each sampled token at ``theta_old`` (pi_old),
``infer_logp`` the rollout engine's (mu), ``mask`` the bool ``[B, T]`` response mask. Every
correction returns ``(weight, stats)``:

- ``weight``: float32 ``[B, T]``, **detached** (the weights are constants: docs/algorithms.md §2.7, §2.8),
  exactly 0 on masked and dropped tokens. It multiplies the per-token loss.
- ``stats``: detached 0-dim float32 tensors ``is_weight_mean`` (mean weight over the originally
  valid tokens, dropped ones counted as 0), ``clipped_frac`` (fraction of valid tokens whose weight
  was truncated) and ``masked_frac`` (fraction of valid tokens dropped). Every kind returns all three
  keys so that logging is uniform; a kind that never truncates (or never drops) reports 0.

Choices shared by all kinds:

- ``log rho`` is computed in float32 with ``torch.where`` so garbage (inf/nan) at masked positions
  never leaks into weights or statistics.
- Bounds are compared in log space (``log rho`` vs ``log bound``); a ratio exactly at a bound counts
  as inside (kept / not truncated).
- A batch without valid tokens gives zero weights and zero statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_moe_rl.losses import masked_mean
from lit_moe_rl.metrics import log_ratio

Stats = dict[str, Tensor]
Correction = Callable[..., tuple[Tensor, Stats]]


def _log_bound(x: float) -> float:
    """``log x`` with ``log 0 = -inf`` (a zero lower bound disables that side)."""
    return math.log(x) if x > 0 else -math.inf


def _finish(
    weight: Tensor, mask: Tensor, clipped: Tensor | None, dropped: Tensor | None
) -> tuple[Tensor, Stats]:
    """Zero the weight off-mask, detach, and compute the three statistics."""
    weight = torch.where(mask, weight, 0.0).detach()
    zero = torch.zeros_like(weight)
    stats = {
        "is_weight_mean": masked_mean(weight, mask),
        "clipped_frac": masked_mean(zero if clipped is None else clipped.float(), mask),
        "masked_frac": masked_mean(zero if dropped is None else dropped.float(), mask),
    }
    return weight, {k: v.detach() for k, v in stats.items()}


def _check_interval(name_low: str, low: float, name_high: str, high: float) -> None:
    if low < 0:
        raise ValueError(f"correction: {name_low} must be >= 0, got {low}")
    if not low < high:
        raise ValueError(
            f"correction: {name_low} must be < {name_high}, got {name_low}={low}, {name_high}={high}"
        )


def no_correction(old_logp: Tensor | None, infer_logp: Tensor | None, mask: Tensor) -> tuple[Tensor, Stats]:
    """No correction: weight 1 on valid tokens. The log-probs are not read and may be ``None``."""
    return _finish(torch.ones(mask.shape, dtype=torch.float32, device=mask.device), mask, None, None)


def token_tis(
    old_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, cap: float = 2.0
) -> tuple[Tensor, Stats]:
    """Token-level truncated importance sampling, ``w_t = min(rho_t, C)``.

    Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (TIS), PPO
    form ``min(pi_old/mu, C) * clipped surrogate`` (docs/algorithms.md §2.7); the R3 paper uses C=2.
    Computed as ``exp(min(log rho, log C))``. ``clipped_frac``: fraction of valid tokens with
    ``rho > C`` (strict).
    """
    if not cap > 0:
        raise ValueError(f"correction: cap must be > 0, got {cap}")
    log_rho = log_ratio(old_logp, infer_logp, mask, what="correction")
    log_cap = math.log(cap)
    return _finish(log_rho.clamp(max=log_cap).exp(), mask, log_rho > log_cap, None)


def seq_tis(old_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, cap: float = 2.0) -> tuple[Tensor, Stats]:
    """Sequence-level TIS, ``w_i = min(prod_t rho_{i,t}, C)`` broadcast over the sequence's tokens.

    Seq-TIS of Liu, Li et al., "When Speed Kills Stability" / verl ``rollout_corr`` (docs/algorithms.md §2.8).
    The product is a sum of ``log rho`` over valid tokens, clamped at ``log C`` before ``exp`` (no
    overflow). ``clipped_frac`` is token-weighted: the fraction of valid tokens that belong to a
    sequence with ``prod rho > C``.
    """
    if not cap > 0:
        raise ValueError(f"correction: cap must be > 0, got {cap}")
    log_rho = log_ratio(old_logp, infer_logp, mask, what="correction")
    log_prod = log_rho.sum(dim=-1, keepdim=True).expand_as(log_rho)
    log_cap = math.log(cap)
    return _finish(log_prod.clamp(max=log_cap).exp(), mask, log_prod > log_cap, None)


def icepop(
    old_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, alpha: float = 0.5, beta: float = 5.0
) -> tuple[Tensor, Stats]:
    """IcePop masking, ``M(rho) = rho if alpha <= rho <= beta else 0``.

    Ring team, IcePop blog / Ring-1T technical report (docs/algorithms.md §2.8), defaults alpha=0.5, beta=5.
    Inside the band the weight is the ratio itself; outside, the token is dropped (``masked_frac``).
    """
    _check_interval("alpha", alpha, "beta", beta)
    log_rho = log_ratio(old_logp, infer_logp, mask, what="correction")
    keep = (log_rho >= _log_bound(alpha)) & (log_rho <= math.log(beta))
    return _finish(torch.where(keep, log_rho.exp(), 0.0), mask, None, ~keep)


def token_rejection(
    old_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, low: float = 0.5, high: float = 2.0
) -> tuple[Tensor, Stats]:
    """Token-level rejection sampling (Token-RS): weight 1 if ``low <= rho <= high`` else 0.

    Liu, Li et al., "When Speed Kills Stability" / verl ``rollout_corr`` (docs/algorithms.md §2.8), typical
    bounds ``[1/C, C]`` with C=2. Choice: this is a pure mask, it does **not** multiply by ``rho``
    (combine with ``token_tis`` for that). ``masked_frac``: fraction of valid tokens rejected.
    """
    _check_interval("low", low, "high", high)
    log_rho = log_ratio(old_logp, infer_logp, mask, what="correction")
    keep = (log_rho >= _log_bound(low)) & (log_rho <= math.log(high))
    return _finish(keep.float(), mask, None, ~keep)


def geo_rejection(
    old_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, low: float = 0.999, high: float = 1.001
) -> tuple[Tensor, Stats]:
    """Geometric-mean rejection sampling (Geo-RS), a length-invariant per-sequence 1/0 mask.

    Liu, Li et al., "When Speed Kills Stability" / verl ``rollout_corr`` (docs/algorithms.md §2.8): sequence i
    is accepted iff ``low <= (prod_t rho_t)^(1/|y_i|) <= high``, i.e. ``exp(mean_t log rho)`` over its
    valid tokens; default bounds are verl's "0.999_1.001". The weight is 1/0 broadcast over the
    sequence (no ``rho`` factor). ``masked_frac``: fraction of valid tokens in rejected sequences.
    """
    _check_interval("low", low, "high", high)
    log_rho = log_ratio(old_logp, infer_logp, mask, what="correction")
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    log_geo = (log_rho.sum(dim=-1, keepdim=True) / count).expand_as(log_rho)
    keep = (log_geo >= _log_bound(low)) & (log_geo <= math.log(high))
    return _finish(keep.float(), mask, None, ~keep)


CORRECTIONS: dict[str, Correction] = {
    "none": no_correction,
    "token_tis": token_tis,
    "seq_tis": seq_tis,
    "icepop": icepop,
    "token_rejection": token_rejection,
    "geo_rejection": geo_rejection,
}


def apply_correction(
    kind: str, old_logp: Tensor | None, infer_logp: Tensor | None, mask: Tensor, **kwargs: float
) -> tuple[Tensor, Stats]:
    """Dispatch to ``CORRECTIONS[kind]``; ``kwargs`` are that correction's keyword parameters."""
    if kind not in CORRECTIONS:
        raise ValueError(f"correction: unknown {kind!r}; choose one of {', '.join(CORRECTIONS)}")
    return CORRECTIONS[kind](old_logp, infer_logp, mask, **kwargs)
