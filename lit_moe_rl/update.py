"""The policy update: ``mini_batches`` optimizer steps per rollout, each accumulating micro-batch
gradients normalised by the mini-batch's *global* token (or sequence) count.

docs/algorithms.md §2.1 pitfall: with gradient accumulation each micro-batch is scaled by its share of
the mini-batch's count, so the micro-batch losses add up to the mini-batch loss exactly; across
ranks the count is all-reduced and each rank's loss multiplied by W (:mod:`lit_moe_rl.distributed`).
A non-finite loss or gradient norm on any rank skips the step on every rank.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from lit_moe_rl.batch import Rollout
from lit_moe_rl.batching import micro_plan
from lit_moe_rl.distributed import all_finite, full_tensor, global_counts, loss_scale, max_over_ranks
from lit_moe_rl.losses import aggregate, kl_estimate


def policy_update(module: Any, rollout: Rollout) -> dict[str, float]:
    """``mini_batches`` optimizer steps over shuffled slices of the rollout (same order on resume)."""
    order = torch.randperm(rollout.num_sequences, generator=torch.Generator().manual_seed(module.global_step))
    totals: dict[str, list[float]] = defaultdict(list)
    for rows in order.tensor_split(module.hparams.mini_batches):
        if max_over_ranks(len(rows), module.device) == 0:
            continue
        for key, value in module.mini_batch_step(rollout, rows).items():
            totals[key].append(value)
    metrics = {key: sum(v) / len(v) for key, v in totals.items()}
    metrics["policy/skipped_steps"] = float(module.skipped_steps)
    metrics["policy/lr"] = module.optimizers().param_groups[0]["lr"]
    return metrics


def mini_batch_step(module: Any, rollout: Rollout, rows: Tensor) -> dict[str, float]:
    """Accumulate gradients over the micro-batches of ``rows``, clip, step (or skip if non-finite)."""
    opt = module.optimizers()
    device = rollout.response_mask.device
    real_rows = rows[:0] if rollout.placeholder else rows
    mask = rollout.response_mask[real_rows.to(device)]
    num_tokens, num_seqs, norm_const = global_counts(
        float(mask.sum()), float(len(real_rows)), float(rollout.max_response_len or mask.shape[1]), device
    )
    norms = dict(num_tokens=max(num_tokens, 1.0), num_seqs=max(num_seqs, 1.0), norm_const=norm_const)
    plan = micro_plan(
        module, rows, fallback=torch.arange(rollout.num_sequences), lengths=module.micro_lengths(rollout)
    )
    stats: dict[str, float] = defaultdict(float)
    finite = True
    for index, (micro_rows, real) in enumerate(plan):
        micro = module.micro_batch(rollout, micro_rows)
        weight = 0.0 if rollout.placeholder or not real else 1.0
        last = index == len(plan) - 1
        with module.forward_context("update", micro), module.router_capture(micro) as cap:
            loss, micro_stats = module.micro_batch_loss(micro, cap, **norms)
            loss = loss * weight if weight else torch.nan_to_num(loss) * 0.0
            finite = all_finite(finite and bool(torch.isfinite(loss)), device)
            if finite:
                with _accumulating(module, last):
                    module.manual_backward(loss * loss_scale())
        if weight:
            share = len(micro_rows) / len(real_rows)
            stats["policy/loss"] += float(loss.detach())
            for key, value in micro_stats.items():
                stats[key if "/" in key else f"policy/{key}"] += float(value) * share
    grad_norm = clip_and_measure(module)
    if not all_finite(finite and math.isfinite(grad_norm), device):
        # Drop the gradients: the optimizer skips parameters whose grad is None, so this step
        # leaves weights and optimizer state untouched yet still counts (trainer.max_steps ends the run).
        opt.zero_grad(set_to_none=True)
        module.skipped_steps += 1
        note_skipped(module)
    opt.step()
    module.lr_schedulers().step()
    opt.zero_grad(set_to_none=True)
    stats["policy/grad_norm"] = grad_norm
    return dict(stats)


def _accumulating(module: Any, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for every micro-batch but the last: one gradient all-reduce per mini-batch."""
    trainer = getattr(module, "_trainer", None)
    block = getattr(getattr(trainer, "strategy", None), "block_backward_sync", None)
    return block() if callable(block) and not last else contextlib.nullcontext()


def micro_batch_loss(
    module: Any, micro: Rollout, capture: Any, *, num_tokens: float, num_seqs: float, norm_const: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The algorithm's loss on one micro-batch, normalised by the mini-batch's global counts."""
    fused = module.fuses_old_pass
    logp, entropy, out = module.sequence_logprobs(
        micro, with_entropy=fused, router_logits=module._aux_loss is not None
    )
    if fused:  # the single update forward is pi_old: ratio exactly 1, as on the first mini-batch
        old_logp = logp.detach()
        module._fused_old.append((micro.rows, old_logp, entropy))
    else:
        old_logp = micro.require("old_logp", "the module's old-log-prob pass")
    algorithm = module.algorithm
    log_weight, shift_metrics = module.router_shift_weight(micro, capture)
    loss, stats = algorithm.objective(
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
    if algorithm.kl_coef > 0:
        ref_logp = micro.require("ref_logp", "lit_moe_rl.callbacks.ReferenceKLCallback")
        kl = kl_estimate(logp, ref_logp, algorithm.kl_kind, mask=micro.response_mask)
        kl_loss = aggregate(kl, micro.response_mask, "token-mean", num_tokens=num_tokens)
        loss = loss + algorithm.kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    if module._aux_loss is not None:  # a micro-batch mean, weighted by its share of the mini-batch
        aux = module._aux_loss(out.router_logits, micro.attention_mask)
        loss = loss + module.hparams.router_aux_loss_coef * aux * (micro.num_sequences / num_seqs)
        stats["aux_loss"] = aux.detach()
    return loss, stats | shift_metrics


def clip_and_measure(module: Any) -> float:
    """Clip the global gradient norm to ``grad_clip`` and return the norm before clipping.

    Under FSDP2 the gradients are sharded ``DTensor`` s; ``clip_grad_norm_`` reduces the norm over the
    shards and :func:`full_tensor` reads its value.
    """
    params = [p for p in module.policy.parameters() if p.grad is not None]
    if not params:
        return 0.0
    max_norm = module.hparams.grad_clip if module.hparams.grad_clip > 0 else float("inf")
    clip = getattr(module.policy, "clip_grad_norm_", None)  # FSDP1 (FSDPStrategy) has its own sharded one
    norm = clip(max_norm) if callable(clip) else torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))


def note_skipped(module: Any) -> None:
    """Say (once per run) that an update was skipped and why, rather than only counting it."""
    if getattr(module, "_skip_noted", False):
        return
    module._skip_noted = True
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"model: optimizer step {module.global_step} skipped: its loss or gradient norm is not finite, so the "
        "weights were left as they were (counted in policy/skipped_steps; check reward/mean for rewards too "
        "large for float32 advantages, and model.lr; warned once)"
    )
