"""Pure sampling math for the rollout engine: temper, truncate, sample, and the log-prob μ of a token.

One decode step turns the last position's logits ``[N, V]`` into a sampled token and its log-prob,
so nothing of size ``N x R x V`` ever exists. The order is the one Hugging Face's logits processors
use: divide by the temperature, then keep the top-k, then the nucleus (top-p) of what is left.

μ (``infer_logp``) comes in two readings, chosen by :class:`SamplingParams.logp_of`:

* ``"sampled"``: log-softmax of the truncated, tempered logits: the distribution the token was
  really drawn from (the right denominator for an importance weight π/μ);
* ``"raw"``: log-softmax of the tempered logits before truncation, which is what the trainer
  computes (``policy.token_logprobs``); train-inference mismatch metrics then measure only numerics.

Both agree when ``top_k == 0`` and ``top_p == 1`` (the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NonFiniteProbabilities",
    "SamplingParams",
    "raise_non_finite",
    "draw",
    "sample_step",
    "sample_step_flagged",
    "temper",
    "token_logp",
    "top_k_filter",
    "top_p_filter",
    "truncate",
]


@dataclass(frozen=True)
class SamplingParams:
    """What one decode step samples from. ``greedy`` takes the argmax (validation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    logp_of: Literal["sampled", "raw"] = "sampled"
    greedy: bool = False


def temper(logits: Tensor, temperature: float) -> Tensor:
    """``logits [N, V] / temperature`` in float32."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the ``k``-th largest of its row to -inf (ties at the k-th are kept; 0 = off)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [N, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches ``p`` (>= 1 token).

    A token is dropped when the mass of the tokens strictly more likely than it already reaches ``p``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [N, V]
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # [N, V]: mass of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def truncate(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (HF's processor order) on already tempered ``logits [N, V]``."""
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log_softmax(logits [N, V])`` at ``tokens [N]`` -> ``[N]`` (float32)."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class NonFiniteProbabilities(RuntimeError):
    """The policy's next-token distribution holds NaN or inf: sampling it would be meaningless."""


def raise_non_finite(count: int, rows: int) -> None:
    """The one-line :class:`NonFiniteProbabilities` for ``count`` bad rows of ``rows``."""
    raise NonFiniteProbabilities(
        f"rollout: the policy's next-token probabilities are NaN or inf in {count} of {rows} "
        "rows (diverged weights or an overflow in low precision); see policy/grad_norm and policy/loss "
        "of the previous steps"
    )


CDF_CHUNK_BYTES = 32 << 20  # float64 cumulative sums per chunk of rows (the glibc mmap threshold on CPU)


def draw(probs: Tensor) -> tuple[Tensor, Tensor]:
    """One token per row of ``probs [N, V]`` (non-negative, any positive total) by inverse transform
    sampling: ``u ~ U[0, 1)`` per row, and the token is the first index whose cumulative mass exceeds
    ``u`` times the row's total. Zero-probability tokens are never drawn. Returns ``(tokens [N] long,
    totals [N] float64)``: each row's total mass, the cumulative sum's last entry, for the caller's
    normalisation (no second pass over ``[N, V]``).

    The same distribution as ``torch.multinomial(probs, 1)``, whose one-sample path is the exponential
    race: V random numbers per row, 85 ms a step for 32 rows at V = 151,936 on 2 CPU cores, most of a
    decode step, against 4 ms here (N random numbers and a cumulative sum). The sum runs in float64 so
    that no token's mass is lost to rounding over 151,936 terms, over chunks of rows of at most
    :data:`CDF_CHUNK_BYTES`. Deterministic under ``torch.manual_seed`` (``torch.rand`` on the device).
    """
    n, vocab = probs.shape
    u = torch.rand(n, dtype=torch.float64, device=probs.device)
    tokens = torch.empty(n, dtype=torch.long, device=probs.device)
    totals = torch.empty(n, dtype=torch.float64, device=probs.device)
    rows = max(1, CDF_CHUNK_BYTES // (8 * vocab))
    for start in range(0, n, rows):
        chunk = slice(start, start + rows)
        cdf = probs[chunk].cumsum(-1, dtype=torch.float64)
        totals[chunk] = cdf[:, -1]
        tokens[chunk] = torch.searchsorted(cdf, (u[chunk] * totals[chunk])[:, None], right=True).squeeze(-1)
    return tokens.clamp_(max=vocab - 1), totals


def sample_step_flagged(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_step` without a host read: ``(tokens, logp, bad)``, ``bad [N]`` True on rows whose
    probabilities are NaN or inf. Such a row is drawn from a uniform stand-in, so :func:`draw` never sees
    it (no device-side error); the caller reads ``bad`` with its other per-step values and
    raises (:func:`raise_non_finite`).

    One ``[N, V]`` buffer beyond the logits: ``probs = exp(truncated - max)`` per row, unnormalised (what
    softmax computes before its division; :func:`draw` takes any total), bad rows filled in place; the
    sampled token's log-prob is ``truncated[token] - max - log(sum probs)``, the sum :func:`draw`'s float64
    total. A row is bad exactly when its max is not finite (a NaN or +inf logit, or every logit -inf);
    otherwise every term is in [0, 1] and the sum is at least 1. At a 151,936-token vocabulary each
    ``[N, V]`` temporary is a fresh mapping of the allocator, paid with page faults at every decode step,
    so the step allocates no other.
    """
    tempered = temper(logits, params.temperature)
    if params.greedy:
        tokens = tempered.argmax(-1)
        return tokens, token_logp(tempered, tokens), torch.zeros_like(tokens, dtype=torch.bool)
    truncated = truncate(tempered, params.top_k, params.top_p)
    peak = truncated.amax(-1, keepdim=True)  # [N, 1]; NaN for a row holding a NaN
    bad = ~torch.isfinite(peak.squeeze(-1))
    probs = (truncated - peak).exp_().masked_fill_(bad[:, None], 1.0)
    tokens, totals = draw(probs)
    if params.logp_of == "sampled":
        logp = truncated.gather(-1, tokens[:, None]).squeeze(-1) - peak.squeeze(-1) - totals.log().float()
    else:
        logp = token_logp(tempered, tokens)
    return tokens, logp, bad


def sample_step(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """One decode step: ``logits [N, V]`` -> ``(tokens [N] long, logp [N] float32)``.

    Samples ``softmax(truncate(logits / T))`` with :func:`draw` (deterministic under
    ``torch.manual_seed``); greedy takes the argmax and reports the raw tempered log-prob. Raises
    :class:`NonFiniteProbabilities` (one line) when a row's probabilities are NaN or inf.
    """
    tokens, logp, bad = sample_step_flagged(logits, params)
    if count := int(bad.sum()):
        raise_non_finite(count, len(logits))
    return tokens, logp
