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
    "check_probabilities",
    "raise_non_finite",
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


def check_probabilities(probs: Tensor) -> None:
    """Raise :class:`NonFiniteProbabilities` (one line) unless every row of ``probs [N, V]`` is finite.

    ``torch.multinomial`` on a NaN or inf row is a device-side assert on CUDA, which kills the CUDA
    context (and the run) without saying which step or why; a NaN row comes from NaN/inf logits (weights
    that diverged, an overflow in low precision) or a row whose logits are all -inf. One host sync; the
    decode loops use :func:`sample_step_flagged` instead, which folds it into their one read per step.
    """
    bad = ~torch.isfinite(probs).all(dim=-1)
    count = int(bad.sum())
    if count:
        raise_non_finite(count, len(probs))


def raise_non_finite(count: int, rows: int) -> None:
    """The one-line :class:`NonFiniteProbabilities` for ``count`` bad rows of ``rows``."""
    raise NonFiniteProbabilities(
        f"rollout: the policy's next-token probabilities are NaN or inf in {count} of {rows} "
        "rows (diverged weights or an overflow in low precision); see policy/grad_norm and policy/loss "
        "of the previous steps"
    )


def sample_step_flagged(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_step` without a host read: ``(tokens, logp, bad)``, ``bad [N]`` True on rows whose
    probabilities are NaN or inf. Such a row is drawn from a uniform stand-in, so ``torch.multinomial``
    never sees it (no device-side assert); the caller reads ``bad`` with its other per-step values and
    raises (:func:`raise_non_finite`). Good rows draw exactly what :func:`sample_step` draws."""
    tempered = temper(logits, params.temperature)
    if params.greedy:
        tokens = tempered.argmax(-1)
        return tokens, token_logp(tempered, tokens), torch.zeros_like(tokens, dtype=torch.bool)
    truncated = truncate(tempered, params.top_k, params.top_p)
    probs = truncated.softmax(-1)
    bad = ~torch.isfinite(probs).all(dim=-1)
    tokens = torch.multinomial(torch.where(bad[:, None], torch.ones_like(probs), probs), 1).squeeze(-1)
    scored = truncated if params.logp_of == "sampled" else tempered
    return tokens, token_logp(scored, tokens), bad


def sample_step(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """One decode step: ``logits [N, V]`` -> ``(tokens [N] long, logp [N] float32)``.

    Samples ``softmax(truncate(logits / T))`` with ``torch.multinomial`` (deterministic under
    ``torch.manual_seed``); greedy takes the argmax and reports the raw tempered log-prob.
    """
    tempered = temper(logits, params.temperature)
    if params.greedy:
        tokens = tempered.argmax(-1)
        return tokens, token_logp(tempered, tokens)
    truncated = truncate(tempered, params.top_k, params.top_p)
    probs = truncated.softmax(-1)
    check_probabilities(probs)
    tokens = torch.multinomial(probs, 1).squeeze(-1)
    scored = truncated if params.logp_of == "sampled" else tempered
    return tokens, token_logp(scored, tokens)
