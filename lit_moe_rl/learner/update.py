"""The policy update: ``mini_batches`` optimizer steps per rollout, each accumulating micro-batch
gradients normalised by the mini-batch's *global* token (or sequence) count.

docs/algorithms.md §2.1 pitfall: with gradient accumulation each micro-batch is scaled by its share of
the mini-batch's count, so the micro-batch losses add up to the mini-batch loss exactly; across
ranks the count is all-reduced and each rank's loss multiplied by W (:mod:`lit_moe_rl.parallel.distributed`).
A non-finite loss or gradient norm on any rank skips the step on every rank.

Statistics: the loss (and its KL term) are shares of the mini-batch's global value (``sum``),
averaged over the updates; the objective's statistics are reduced by the kinds its loss declares
(:data:`lit_moe_rl.losses.GRPO_STAT_KINDS`); RSPO's by :mod:`.rspo_weight`.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lit_moe_rl.batch import Rollout
from lit_moe_rl.learner.rspo_weight import router_shift_weight
from lit_moe_rl.learner.stats import Stats
from lit_moe_rl.losses import aggregate, kl_estimate
from lit_moe_rl.parallel.distributed import full_tensor
from lit_moe_rl.routing.record import RouterLogitsCapture

if TYPE_CHECKING:
    from lit_moe_rl.learner.learner import Learner


PER_UPDATE = ("policy/loss", "policy/kl_loss")
"""Sums over one update's micro-batches and ranks (shares of its global value), averaged over updates."""


def policy_update(learner: Learner, rollout: Rollout, stats: Stats, optimizer_step: int) -> Stats:
    """``mini_batches`` optimizer steps over shuffled slices of the rollout (same order on resume)."""
    order = torch.randperm(rollout.num_sequences, generator=torch.Generator().manual_seed(optimizer_step))
    slices = order.tensor_split(learner.settings.mini_batches)
    running = [rows for rows in slices if learner.collectives.max(len(rows)) > 0]
    for rows in running:
        stats.merge(learner.mini_batch_step(rollout, rows, updates=len(running)))
    stats.mean("policy/skipped_steps", float(learner.skipped_steps), 1.0)
    return stats


def mini_batch_step(learner: Learner, rollout: Rollout, rows: Tensor, *, updates: int = 1) -> Stats:
    """Accumulate gradients over the micro-batches of ``rows``, clip, step (or skip if non-finite).

    ``updates``: the rollout's number of mini-batch steps (the loss is logged as their mean)."""
    opt, collectives = learner.optimizer, learner.collectives
    device = rollout.response_mask.device
    real_rows = rows[:0] if rollout.placeholder else rows
    mask = rollout.response_mask[real_rows.to(device)]
    num_tokens, num_seqs, norm_const = collectives.global_counts(
        float(mask.sum()), float(len(real_rows)), float(rollout.max_response_len or mask.shape[1])
    )
    norms = dict(num_tokens=max(num_tokens, 1.0), num_seqs=max(num_seqs, 1.0), norm_const=norm_const)
    plan = learner.micro_plan(rollout, rows)
    stats = Stats()
    finite = True
    for index, (micro_rows, real) in enumerate(plan):
        micro = learner.micro_batch(rollout, micro_rows)
        weight = 0.0 if rollout.placeholder or not real else 1.0
        phase = "fused" if learner.fuses_old_pass else "update"  # the one forward is also π_old
        with learner.forward_context(phase, micro), learner.router_capture(micro) as cap:
            loss, micro_stats = learner.micro_batch_loss(micro, cap, **norms)
            loss = loss * weight if weight else torch.nan_to_num(loss) * 0.0
            finite = collectives.all_finite(finite and bool(torch.isfinite(loss)))
            if finite:
                with _accumulating(learner, last=index == len(plan) - 1):
                    learner.backward(loss * collectives.loss_scale())
        if weight:
            stats.sum("policy/loss", float(loss.detach()))
            stats.merge(micro_stats)
    stats.scale(PER_UPDATE, 1.0 / updates)  # logged as the mean over the rollout's updates
    grad_norm = clip_and_measure(learner.policy, learner.settings.grad_clip)
    if not collectives.all_finite(finite and math.isfinite(grad_norm)):
        # Drop the gradients: the optimizer skips parameters whose grad is None, so this step
        # leaves weights and optimizer state untouched yet still counts (a step budget ends the run).
        opt.zero_grad(set_to_none=True)
        learner.skipped_steps += 1
        note_skipped(learner)
    for group in opt.param_groups:  # the rates this step uses, read before the scheduler moves them
        name = group.get("name", "policy")  # policy/lr, and policy/lr_router under model.router_lr_scale
        stats.mean("policy/lr" + ("" if name == "policy" else f"_{name}"), group["lr"], 1.0)
    opt.step()
    learner.optimizer_step += 1
    learner.scheduler.step()
    opt.zero_grad(set_to_none=True)
    stats.mean("policy/grad_norm", grad_norm, 1.0)
    return stats


def _accumulating(learner: Learner, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for every micro-batch but the last: one gradient all-reduce per mini-batch."""
    return learner.no_sync() if learner.no_sync is not None and not last else contextlib.nullcontext()


def micro_batch_loss(
    learner: Learner,
    micro: Rollout,
    capture: RouterLogitsCapture | None,
    *,
    num_tokens: float,
    num_seqs: float,
    norm_const: float,
) -> tuple[Tensor, Stats]:
    """The algorithm's loss on one micro-batch, normalised by the mini-batch's global counts, and the
    micro-batch's statistics (each with its kind and this micro-batch's token / sequence weight)."""
    fused = learner.fuses_old_pass
    logp, entropy, out = learner.sequence_logprobs(
        micro, with_entropy=fused, router_logits=learner.aux_loss is not None
    )
    if fused:  # the single update forward is pi_old: ratio exactly 1, as on the first mini-batch
        old_logp = logp.detach()
        learner.fused_old.append((micro.rows, old_logp, entropy))
    else:
        old_logp = micro.require("old_logp", "the learner's old-log-prob pass")
    algorithm = learner.algorithm
    stats = Stats()
    log_weight = router_shift_weight(algorithm, micro, capture, stats)
    loss, values = algorithm.objective(
        logp,
        old_logp,
        micro.advantages,
        micro.response_mask,
        log_weight=log_weight,
        token_weight=micro.token_weight,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        norm_const=norm_const,
    )
    add_objective_stats(stats, values, algorithm.stat_kinds, micro.response_mask)
    if algorithm.kl_coef > 0:
        ref_logp = micro.require("ref_logp", "lit_moe_rl.callbacks.ReferenceKLCallback")
        kl = kl_estimate(logp, ref_logp, algorithm.kl_kind, mask=micro.response_mask)
        kl_loss = aggregate(kl, micro.response_mask, "token-mean", num_tokens=num_tokens)
        loss = loss + algorithm.kl_coef * kl_loss
        stats.sum("policy/kl_loss", kl_loss.detach())  # a share of the mini-batch's token mean
    if learner.aux_loss is not None:  # a micro-batch mean, weighted by its share of the mini-batch
        aux = learner.aux_loss(out.router_logits, micro.attention_mask)
        loss = loss + learner.settings.router_aux_loss_coef * aux * (micro.num_sequences / num_seqs)
        stats.mean("policy/aux_loss", aux.detach(), float(micro.num_sequences), "seq_mean")
    return loss, stats


def add_objective_stats(stats: Stats, values: dict[str, Tensor], kinds: dict[str, str], mask: Tensor) -> None:
    """The objective's per-micro-batch statistics under ``policy/``, weighted by what each averages over:
    response tokens (``token_mean``) or sequences with a token (``seq_mean``); extremes need a token."""
    tokens = float(mask.sum())
    seqs = float(mask.any(-1).sum())
    for key, value in values.items():
        name = key if "/" in key else f"policy/{key}"
        kind = kinds.get(key) or (
            "max" if key.endswith("max") else "min" if key.endswith("min") else "token_mean"
        )
        stats.add(name, value, kind, seqs if kind == "seq_mean" else tokens)


def clip_and_measure(policy: torch.nn.Module, grad_clip: float) -> float:
    """Clip the global gradient norm to ``grad_clip`` (0 = no clipping) and return the norm before clipping.

    Under FSDP2 the gradients are sharded ``DTensor`` s; ``clip_grad_norm_`` reduces the norm over the
    shards and :func:`full_tensor` reads its value.
    """
    params = [p for p in policy.parameters() if p.grad is not None]
    if not params:
        return 0.0
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    clip = getattr(policy, "clip_grad_norm_", None)  # FSDP1 (FSDPStrategy) has its own sharded one
    norm = clip(max_norm) if callable(clip) else torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))


def note_skipped(learner: Learner) -> None:
    """Say (once per run) that an update was skipped and why, rather than only counting it."""
    if learner.skip_noted:
        return
    learner.skip_noted = True
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"model: optimizer step {learner.optimizer_step} skipped: its loss or gradient norm is not finite, so the "
        "weights were left as they were (counted in policy/skipped_steps; check reward/mean for rewards too "
        "large for float32 advantages, and model.lr; warned once)"
    )
