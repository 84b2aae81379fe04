"""The π_old pass: log-probs of every response token once per rollout, without gradient.

Also the reference model's log-probs (when a reference is attached), RSPO's old top-K expert ids and
their router log-probs (router-shift tracking), the train-inference ``mismatch/*`` metrics and the
off-policy correction weights on ``ρ = π_old / μ``. Every rank runs the same number of forwards
(:func:`lit_moe_rl.learner.batching.micro_plan`): under FSDP each forward is a collective. Statistics go into a
:class:`~lit_moe_rl.learner.stats.Stats`, each declared with its kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lit_moe_rl.batch import Rollout
from lit_moe_rl.corrections import CORRECTIONS, apply_correction
from lit_moe_rl.learner.batching import scatter_rows
from lit_moe_rl.learner.stats import Stats
from lit_moe_rl.losses import kl_estimate, masked_mean
from lit_moe_rl.metrics import extreme_token_fraction, logp_diff_stats, train_infer_kl
from lit_moe_rl.routing.record import gather_router_logp

if TYPE_CHECKING:
    from lit_moe_rl.learner.learner import Learner

TAUS = (1.5, 2.0, 5.0, 10.0)


@torch.no_grad()
def compute_old_logprobs(learner: Learner, rollout: Rollout, stats: Stats | None = None) -> Stats:
    """π_old log-probs (and entropies) of every response token, once per rollout, into ``rollout``.

    The policy stays in the training mode :func:`~lit_moe_rl.policy.set_training_mode` set (dropout
    zeroed): this pass and the update compute the same function, so the first update's ratio is 1.

    With router-shift tracking on, also the old top-K expert ids and their router log-probs at the
    positions that predict each response token (RSPO, arXiv 2510.23027).
    """
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {
        "old": [],
        "ent": [],
        "topk": [],
        "router": [],
        "ref": [],
    }
    stats = stats if stats is not None else Stats()
    for rows, real in learner.micro_plan(rollout, torch.arange(rollout.num_sequences)):
        micro = learner.micro_batch(rollout, rows)
        with learner.forward_context("old", micro), learner.router_capture(micro) as cap:
            logp, entropy, _ = learner.sequence_logprobs(micro, with_entropy=True)
        reference = learner.reference
        ref_logp = reference.reference_logprobs(learner, micro) if reference is not None else None
        if not real:  # a padding forward that keeps ranks in step: its outputs are duplicates
            continue
        parts["old"].append((rows, logp))
        parts["ent"].append((rows, entropy))
        if ref_logp is not None:
            parts["ref"].append((rows, ref_logp))
        if cap is not None:
            parts["topk"].append((rows, cap.topk.cpu()))
            parts["router"].append((rows, gather_router_logp(cap.router_logp, cap.topk).cpu()))
    n, width = rollout.num_sequences, rollout.response_len
    rollout.old_logp = scatter_rows(parts["old"], n, width)
    if parts["topk"]:
        rollout.old_topk = scatter_rows(parts["topk"], n, width)
        rollout.old_router_logp = scatter_rows(parts["router"], n, width)
    if parts["ref"]:
        rollout.ref_logp = scatter_rows(parts["ref"], n, width)
    old_pass_metrics(rollout, scatter_rows(parts["ent"], n, width), stats)
    if rollout.infer_logp is not None:
        s = learner.settings
        correction_weights(s.correction, s.correction_args, rollout, stats)
    return stats


def collect_fused_old_logprobs(
    fused: list[tuple[Tensor, Tensor, Tensor]], rollout: Rollout, stats: Stats
) -> Stats:
    """π_old from the update forward (detached, taken before the step) into ``rollout``, and its metrics.

    ``fused``: ``(rows, logp, entropy)`` of each update micro-batch (padding ones repeat rows: harmless).
    """
    n, width = rollout.num_sequences, rollout.response_len
    old = scatter_rows([(rows, logp.float()) for rows, logp, _ in fused], n, width)
    entropy = scatter_rows([(rows, ent.float()) for rows, _, ent in fused], n, width)
    fused.clear()
    rollout.old_logp = old
    return old_pass_metrics(rollout, entropy, stats)


def _tokens(rollout: Rollout) -> float:
    """The token weight of this rank's rollout statistics (0 for a placeholder that trains nothing)."""
    return 0.0 if rollout.placeholder else float(rollout.response_mask.sum())


def old_pass_metrics(rollout: Rollout, entropy: Tensor, stats: Stats) -> Stats:
    """``policy/entropy`` of π_old, ``ref/kl`` and the train-inference ``mismatch/*`` metrics (token means)."""
    mask, tokens = rollout.response_mask, _tokens(rollout)
    stats.mean("policy/entropy", masked_mean(entropy, mask), tokens, "token_mean")
    if rollout.ref_logp is not None:
        kl = kl_estimate(rollout.old_logp, rollout.ref_logp, "k3", mask=mask)
        stats.mean("ref/kl", masked_mean(kl, mask), tokens, "token_mean")
    if rollout.infer_logp is not None:
        mismatch_metrics(rollout.old_logp, rollout.infer_logp, mask, stats, tokens)
    return stats


def correction_weights(kind: str, args: dict[str, float], rollout: Rollout, stats: Stats) -> None:
    """Off-policy correction weights on ρ = π_old/μ into ``rollout.token_weight``; their token means."""
    if kind == "none":
        return
    weight, values = apply_correction(
        kind, rollout.old_logp, rollout.infer_logp, rollout.response_mask, **args
    )
    rollout.token_weight = weight
    for key, value in values.items():
        stats.mean(f"mismatch/{key}", value, _tokens(rollout), "token_mean")


def mismatch_metrics(
    train_logp: Tensor, infer_logp: Tensor, mask: Tensor, stats: Stats, tokens: float
) -> None:
    """``mismatch/*``: train-inference KL (R3 Eq. 2), extreme-token fractions (Eq. 3), |Δ log p|."""
    stats.mean("mismatch/train_infer_kl", train_infer_kl(train_logp, infer_logp, mask), tokens, "token_mean")
    for tau in TAUS:
        value = extreme_token_fraction(train_logp, infer_logp, mask, tau)
        stats.mean(f"mismatch/extreme_frac_tau{tau:g}", value, tokens, "token_mean")
    diff = logp_diff_stats(train_logp, infer_logp, mask)
    stats.mean("mismatch/logp_absdiff_mean", diff["logp_absdiff_mean"], tokens, "token_mean")
    stats.extreme("mismatch/logp_absdiff_max", diff["logp_absdiff_max"], "max", tokens)


def check_correction(kind: str, args: dict[str, float]) -> None:
    """Fail at start-up on an unknown correction or bad parameters, not at the first step."""
    if kind not in CORRECTIONS:
        raise ValueError(f"model.correction: unknown {kind!r}; choose one of {', '.join(CORRECTIONS)}")
    zeros = torch.zeros(1, 1, dtype=torch.float32)
    try:
        apply_correction(kind, zeros, zeros, torch.ones(1, 1, dtype=torch.bool), **args)
    except TypeError as err:
        raise ValueError(f"model.correction_args: {err}") from None
