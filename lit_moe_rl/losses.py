"""Policy-gradient losses of the GRPO family, as pure tensor functions.

Conventions (shared by every function here):

- ``logp``, ``old_logp``, ``mask``, ``log_weight`` are ``[B, T]``: ``B`` sequences, ``T`` response
  positions. ``mask`` is bool or 0/1 float; only positions where it is non-zero count.
- Masked-out positions may hold garbage (``nan``, ``inf``). Every input is passed through
  ``torch.where`` before any arithmetic, so garbage reaches neither the loss nor the gradient
  (multiplying by the mask would not do: ``0 * nan = nan``, also in the backward pass).
- ``advantages`` is ``[B]`` (one advantage per sequence, broadcast over its tokens) or ``[B, T]``.
- ``old_logp``, ``advantages`` and ``log_weight`` are constants: they are detached here.
- ``log_weight`` (optional) is added to the token log-ratio **before** clipping. It is RSPO's
  ``log γ̃`` (docs/algorithms.md §4.3, v2 form: ``w̃ = γ̃·w``).
- Losses return ``(loss, stats)``: ``loss`` is a scalar to *minimise* (the negated objective),
  ``stats`` maps names to detached scalar tensors (no ``.item()``, so no device sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "aggregate",
    "gmpo_loss",
    "grpo_loss",
    "gspo_loss",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "k3+")

Count = int | float | Tensor

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp, as verl (exp(20) ~ 4.9e8 stays finite in fp32)
GSPO_LOG_RATIO_MAX = 10.0  # verl's upper clamp on GSPO's log s_{i,t}


# How each loss's statistics combine across micro-batches and ranks (lit_moe_rl.learner.stats): a
# token fraction is a token mean, GSPO's sequence-level flags and the GSPO/GMPO sequence ratios are
# sequence means, the ratio extremes are extremes.
_CLIP = ("clipfrac_low", "clipfrac_high", "clipfrac")
GRPO_STAT_KINDS = {
    **dict.fromkeys((*_CLIP, "clipfrac_dual", "ppo_kl", "ratio_mean"), "token_mean"),
    "ratio_min": "min",
    "ratio_max": "max",
}
GSPO_STAT_KINDS = {
    **dict.fromkeys((*_CLIP, "ratio_mean"), "seq_mean"),
    "ppo_kl": "token_mean",
    "ratio_min": "min",
    "ratio_max": "max",
}
GMPO_STAT_KINDS = {**GRPO_STAT_KINDS, "ratio_mean": "seq_mean"}


# ----------------------------------------------------------------------------- masking helpers


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero (over all, or along ``dim``).

    Masked-out entries are selected away with ``torch.where``, so ``nan``/``inf`` there neither
    reach the result nor its gradient. ``mask`` broadcasts against ``x``.
    """
    x, m = torch.broadcast_tensors(x, _bool_mask(mask))
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero; ``0`` where nothing is selected."""
    x, m = torch.broadcast_tensors(x, _bool_mask(mask))
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(1).to(x.dtype)


def _masked_extrema(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) of ``x`` over the mask; both ``0`` when the mask is empty."""
    x, m = torch.broadcast_tensors(x.detach(), _bool_mask(mask))
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    any_tok, zero = m.any(), torch.zeros_like(inf)  # no host sync: select instead of branching
    return (
        torch.where(any_tok, torch.where(m, x, inf).min(), zero),
        torch.where(any_tok, torch.where(m, x, -inf).max(), zero),
    )


def _prepare(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, log_weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sanitise inputs: bool mask, and zeros at masked positions of logp/old_logp/log_weight/adv.

    Returns ``(logp, old_logp, adv, log_weight, mask)``, all ``[B, T]``; everything but ``logp``
    detached.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [B, T]; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    m = _bool_mask(mask)  # [B, T]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        adv = advantages.detach()[:, None].expand_as(logp)  # [B, T]
    elif advantages.shape == logp.shape:
        adv = advantages.detach()  # [B, T]
    else:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logp.shape)}; got {tuple(advantages.shape)}"
        )
    lw = zero.expand_as(logp) if log_weight is None else log_weight.detach()  # [B, T]
    return (
        torch.where(m, logp, zero),
        torch.where(m, old_logp.detach(), zero),
        torch.where(m, adv, zero),  # no down-cast: fp32 advantages stay fp32 next to bf16 logp
        torch.where(m, lw, zero),
        m,
    )


def _weighted(token_loss: Tensor, token_weight: Tensor | None, m: Tensor) -> Tensor:
    """``token_loss * token_weight`` (detached), zero at masked positions; unchanged when None."""
    if token_weight is None:
        return token_loss
    return torch.where(
        m, token_loss * token_weight.detach().to(token_loss.dtype), torch.zeros_like(token_loss)
    )


def _rows_with_tokens(mask: Tensor) -> Tensor:
    return (_bool_mask(mask).sum(-1) > 0).sum()  # scalar long


# ----------------------------------------------------------------------------- aggregation


def aggregate(
    token_loss: Tensor,
    mask: Tensor,
    agg: str,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    norm_const: Count | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss ``L`` with mask ``m`` to a scalar (verl ``agg_loss``).

    docs/algorithms.md §2.1 "Loss aggregation modes":

    - ``token-mean``: ``Σ_{i,t} m L / num_tokens`` — DAPO's token-level loss (Yu et al. 2025,
      arXiv 2503.14476, §3.3 Token-Level Policy Gradient Loss). ``num_tokens`` defaults to ``Σ m`` (min 1).
    - ``seq-mean-token-mean``: ``Σ_i [Σ_t m L / Σ_t m] / num_seqs`` — the original GRPO
      ``(1/G) Σ_i (1/|y_i|) Σ_t`` (DeepSeekMath, arXiv 2402.03300, Eq. (3)).
    - ``seq-mean-token-sum``: ``Σ_{i,t} m L / num_seqs``.
    - ``seq-mean-token-sum-norm``: ``Σ_{i,t} m L / (norm_const · num_seqs)`` — Dr. GRPO (Liu et al.
      2025, arXiv 2503.20783, §3.2 Dr. GRPO objective): per-sequence token *sums* divided by a constant, then the
      ``1/G`` sequence mean. ``norm_const`` defaults to ``T`` (the padded response length); pass the
      max generation length to keep it constant across steps. This matches current verl
      (``seq_losses / loss_scale_factor`` then ``sum / global_batch_size``) and the oat code GMPO
      forks (``masked_sum(..., constant_normalizer=max_len)`` then a batch mean). Older verl
      divided the total by ``T`` only (no ``1/num_seqs``); that differs by the constant ``B``.

    ``num_seqs`` defaults to the number of rows with at least one token (min 1); rows without
    tokens contribute 0 in every mode.

    Gradient accumulation: pass the **global** mini-batch ``num_tokens`` / ``num_seqs`` (and one
    fixed ``norm_const``) to every micro-batch; the micro-batch losses then *sum* to the mini-batch
    loss exactly. With the defaults, each call normalises by its own counts.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown {agg!r}; choose one of {', '.join(AGG_MODES)}")
    m = _bool_mask(mask)  # [B, T]
    if agg == "token-mean":
        denom = m.sum().clamp_min(1) if num_tokens is None else num_tokens
        return masked_sum(token_loss, m) / denom
    seq_num = _rows_with_tokens(m).clamp_min(1) if num_seqs is None else num_seqs
    seq_sum = masked_sum(token_loss, m, dim=-1)  # [B]
    if agg == "seq-mean-token-mean":
        return (seq_sum / m.sum(-1).clamp_min(1).to(seq_sum.dtype)).sum() / seq_num
    if agg == "seq-mean-token-sum":
        return seq_sum.sum() / seq_num
    const = m.shape[-1] if norm_const is None else norm_const
    return seq_sum.sum() / (const * seq_num)


# ----------------------------------------------------------------------------- policy losses


def _clip_stats(low: Tensor, high: Tensor, mask: Tensor, agg: str = "token-mean") -> dict[str, Tensor]:
    """Clip fractions of the boolean ``[B, T]`` flags ``low`` / ``high``, reduced with ``agg``."""
    frac_low = aggregate(low.to(torch.float32), mask, agg).detach()
    frac_high = aggregate(high.to(torch.float32), mask, agg).detach()
    return {"clipfrac_low": frac_low, "clipfrac_high": frac_high, "clipfrac": frac_low + frac_high}


def _ratio_stats(
    ratio: Tensor, mask: Tensor, logp: Tensor, old_logp: Tensor, tok_mask: Tensor
) -> dict[str, Tensor]:
    """``ppo_kl`` (token masked mean of old_logp - logp) and mean/min/max of ``ratio`` over ``mask``."""
    r_min, r_max = _masked_extrema(ratio, mask)
    return {
        "ppo_kl": masked_mean((old_logp - logp).detach(), tok_mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "ratio_min": r_min,
        "ratio_max": r_max,
    }


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    log_weight: Tensor | None = None,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    norm_const: Count | None = None,
    clip_ratio_c: float | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate with asymmetric (DAPO clip-higher) ranges.

    GRPO objective as restated in GSPO (Zheng et al. 2025, arXiv 2507.18071) Eq. (2)–(3) / PPO
    (Schulman et al. 2017, arXiv 1707.06347) Eq. (7), with DAPO's decoupled ``ε_low, ε_high``
    (Yu et al. 2025, arXiv 2503.14476, §3.1 Clip-Higher); docs/algorithms.md §2.1, §2.3:

        w_t   = exp(clamp(logp - old_logp + log_weight, -20, 20))
        L_t   = max(-A_t w_t, -A_t clip(w_t, 1 - clip_low, 1 + clip_high))

    then ``aggregate(L, mask, agg)``. ``log_weight`` (RSPO ``log γ̃``, docs/algorithms.md §4.3) shifts
    the ratio before the clip. The ``±20`` clamp on the log-ratio (as verl) keeps ``exp`` finite;
    it zeroes the gradient of tokens beyond it (such tokens are clipped anyway unless ``A`` has the
    opposite sign).

    Dual-clip PPO (Ye et al. 2020, arXiv 1912.09729; verl ``clip_ratio_c``; docs/algorithms.md §2.4), off by default: with
    ``clip_ratio_c = c > 1``, tokens with ``A < 0`` use ``min(L_t, -A_t c)``.

    ``token_weight`` (detached ``[B, T]``) multiplies each token's clipped loss: the off-policy
    correction weights of :mod:`lit_moe_rl.corrections` (TIS PPO form, docs/algorithms.md §2.7-2.8).

    Stats: ``clipfrac_low`` (A<0 and w<1-clip_low), ``clipfrac_high`` (A>0 and w>1+clip_high),
    ``clipfrac`` (their sum), ``clipfrac_dual`` (A<0 and w>c; 0 when off) — token fractions;
    ``ppo_kl`` (masked mean of old_logp - logp, without log_weight); ``ratio_mean/min/max`` of w.
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c: must be > 1 for dual-clip PPO, got {clip_ratio_c}")
    logp, old_logp, adv, lw, m = _prepare(logp, old_logp, advantages, mask, log_weight)
    log_ratio = (logp - old_logp + lw).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    loss_unclipped = -adv * ratio  # [B, T]
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    token_loss = torch.maximum(loss_unclipped, loss_clipped)  # [B, T]
    dual = torch.zeros_like(m)  # [B, T] bool
    if clip_ratio_c is not None:
        dual = (adv < 0) & (ratio > clip_ratio_c)
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -adv * clip_ratio_c), token_loss)
    token_loss = _weighted(token_loss, token_weight, m)
    loss = aggregate(token_loss, m, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_const=norm_const)
    stats = _clip_stats((adv < 0) & (ratio < 1.0 - clip_low), (adv > 0) & (ratio > 1.0 + clip_high), m)
    stats["clipfrac_dual"] = masked_mean(dual.to(torch.float32), m)
    stats.update(_ratio_stats(ratio, m, logp, old_logp, m))
    return loss, stats


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    log_weight: Tensor | None = None,
    num_seqs: Count | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: sequence-level, length-normalised ratio with sequence-level clipping.

    GSPO (Zheng et al. 2025, arXiv 2507.18071) Eq. (5)–(7), implemented in the GSPO-token form of
    Eq. (13)–(14) (docs/algorithms.md §2.5), as verl does:

        s_i     = exp( Σ_t m (logp - old_logp + log_weight) / Σ_t m )        (detached)
        s_{i,t} = exp( min(log sg[s_i] + logp_t - sg[logp_t], 10) )          (= s_i in value)
        L_{i,t} = max(-A s_{i,t}, -A clip(s_{i,t}, 1 - clip_low, 1 + clip_high))

    aggregated ``seq-mean-token-mean`` (forced; ``num_seqs`` for gradient accumulation). With
    ``[B]`` advantages this equals GSPO exactly; its unclipped gradient is
    ``-s_i A_i (1/|y_i|) Σ_t ∇logp_t / num_seqs``. ``log_weight`` (RSPO, docs/algorithms.md §4.3) enters
    ``s_i`` as ``GM_t(γ̃)``. The ``log ≤ 10`` clamp is verl's (it zeroes the gradient above it).

    Stats: ``clipfrac_low`` / ``clipfrac_high`` / ``clipfrac`` are **sequence** fractions (the
    flags A<0 & s<1-clip_low, A>0 & s>1+clip_high, reduced seq-mean-token-mean: with ``[B]``
    advantages this is exactly the fraction of sequences clipped); ``ppo_kl`` is the token masked
    mean of old_logp - logp; ``ratio_mean/min/max`` are over the sequences' ``s_i``.
    ``token_weight`` multiplies each token's loss, as in :func:`grpo_loss`.
    """
    logp, old_logp, adv, lw, m = _prepare(logp, old_logp, advantages, mask, log_weight)
    log_s = masked_mean(logp.detach() - old_logp + lw, m, dim=-1)  # [B], detached
    log_s_tok = (log_s[:, None] + logp - logp.detach()).clamp(max=GSPO_LOG_RATIO_MAX)  # [B, T]
    s_tok = torch.exp(log_s_tok)  # [B, T]
    loss_unclipped = -adv * s_tok  # [B, T]
    loss_clipped = -adv * s_tok.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    token_loss = _weighted(torch.maximum(loss_unclipped, loss_clipped), token_weight, m)  # [B, T]
    loss = aggregate(token_loss, m, "seq-mean-token-mean", num_seqs=num_seqs)
    s_seq = torch.exp(log_s.clamp(max=GSPO_LOG_RATIO_MAX))  # [B]
    has_tok = m.any(-1)  # [B]
    stats = _clip_stats(
        (adv < 0) & (s_tok < 1.0 - clip_low), (adv > 0) & (s_tok > 1.0 + clip_high), m, "seq-mean-token-mean"
    )
    stats.update(_ratio_stats(s_seq, has_tok, logp, old_logp, m))
    return loss, stats


def gmpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
    log_weight: Tensor | None = None,
    num_seqs: Count | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO: geometric mean of token ratios with sign-aware, token-level log-space clipping.

    GMPO (Zhao et al. 2025, arXiv 2507.20673) clipped objective as implemented by the authors
    (callsys/GMPO, verl ``geo_mean``; the paper's equation numbering was not checked, the spec
    comes from that code); docs/algorithms.md §2.6:

        δ_t     = clamp(logp - old_logp + log_weight, -20, 20)
        δ̂_t     = sgn(A)·min(sgn(A)·δ_t, sgn(A)·clamp(δ_t, -clip_low, clip_high))
        ratio_i = exp( Σ_t m δ̂_t / Σ_t m ),     L_i = -A_i·ratio_i
        loss    = Σ_i L_i / num_seqs

    For ``A ≥ 0`` only the upper bound binds, for ``A < 0`` only the lower; a clipped token has zero
    gradient. Choices: ``sgn(0) = +1`` (verl's ``torch.sign`` gives 0, which un-clips the token; the
    loss is 0 either way but ``ratio`` stats differ); the ``±20`` clamp on δ (not in verl) keeps the
    unbounded side of the clip finite. With ``[B, T]`` advantages, each token's own sign picks its
    clip side and ``A_i`` is the masked mean advantage of the sequence. ``log_weight`` is RSPO's
    ``log γ̃`` (docs/algorithms.md §4.3: RSPO = GMPO + RS). ``num_seqs`` defaults to the rows with
    tokens; pass the global count under gradient accumulation.

    ``token_weight`` (detached ``[B, T]``, off-policy corrections) scales ``L_i`` by the masked
    mean of the sequence's token weights (GMPO has no per-token loss to weight; for sequence-level
    corrections such as seq-TIS or Geo-RS the weight is constant per sequence, so this is exact).

    Stats: token fractions ``clipfrac_low`` (A<0 and δ<-clip_low), ``clipfrac_high`` (A>0 and
    δ>clip_high), ``clipfrac``; ``ppo_kl``; ``ratio_mean/min/max`` over the sequences' ``ratio_i``.
    """
    logp, old_logp, adv, lw, m = _prepare(logp, old_logp, advantages, mask, log_weight)
    delta = (logp - old_logp + lw).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    sgn = torch.where(adv >= 0, 1.0, -1.0).to(delta.dtype)  # [B, T]
    delta_hat = sgn * torch.minimum(sgn * delta, sgn * delta.clamp(-clip_low, clip_high))  # [B, T]
    ratio = torch.exp(masked_mean(delta_hat, m, dim=-1))  # [B]
    adv_seq = masked_mean(adv, m, dim=-1)  # [B]
    has_tok = m.any(-1)  # [B]
    seq_loss = torch.where(has_tok, -adv_seq * ratio, torch.zeros_like(ratio))  # [B]
    if token_weight is not None:
        seq_loss = seq_loss * masked_mean(token_weight.detach().to(seq_loss.dtype), m, dim=-1)  # [B]
    denom = _rows_with_tokens(m).clamp_min(1) if num_seqs is None else num_seqs
    loss = seq_loss.sum() / denom
    stats = _clip_stats((adv < 0) & (delta < -clip_low), (adv > 0) & (delta > clip_high), m)
    stats.update(_ratio_stats(ratio, has_tok, logp, old_logp, m))
    return loss, stats


# ----------------------------------------------------------------------------- KL


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str, *, mask: Tensor | None = None) -> Tensor:
    """Per-token estimate ``[B, T]`` of KL(π_θ ‖ π_ref) at the sampled tokens, ``Δ = logp - ref_logp``.

    Schulman, "Approximating KL divergence" (2020) estimators, as GRPO (DeepSeekMath, arXiv
    2402.03300, Eq. (4)) and verl ``kl_penalty_forward`` use them (docs/algorithms.md §2.1):

    - ``k1 = Δ``
    - ``k2 = ½ Δ²``
    - ``k3 = exp(-Δ) + Δ - 1`` with verl's clamps: ``-Δ`` to ``[-20, 20]`` before ``exp``, the result
      to ``[-10, 10]``
    - ``k3+``: value of ``k3``, gradient of ``k2`` (straight-through ``k2 + sg[k3 - k2]``)

    ``ref_logp`` is detached. Masked positions are *not* zeroed unless ``mask`` is given; then
    ``Δ`` is set to 0 there (so the estimate and its gradient are 0 and garbage cannot leak through
    ``exp`` in the backward pass). Reduce with :func:`aggregate`.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_kind: unknown {kind!r}; choose one of {', '.join(KL_KINDS)}")
    ref_logp = ref_logp.detach()
    if mask is not None:
        m, zero = _bool_mask(mask), torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, ref_logp = torch.where(m, logp, zero), torch.where(m, ref_logp, zero)
    delta = logp - ref_logp  # [B, T]
    if kind == "k1":
        return delta
    k2 = 0.5 * delta.square()  # [B, T]
    if kind == "k2":
        return k2
    neg = (-delta).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T] = log(π_ref/π_θ)
    k3 = (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)  # [B, T]
    if kind == "k3":
        return k3
    return k2 + (k3 - k2).detach()
