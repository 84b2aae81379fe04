"""The LightningModule: policy forward -> per-token log-probs -> algorithm -> manual optimisation.

No generation and no rewards here: :class:`~lit_moe_rl.callbacks.rollout.RolloutCallback` puts a
scored :class:`~lit_moe_rl.batch.Rollout` into the batch. One training step is one rollout:

1. old log-probs once, without grad, in micro-batches (the PPO anchor π_old);
2. ``mini_batches`` optimizer updates over shuffled slices of the rollout, each accumulating
   micro-batch gradients scaled by the mini-batch's *global* token (or sequence) count, then
   gradient clipping and a step; a non-finite loss or gradient norm skips the step.

Callbacks that must wrap the policy's forwards (routing replay) register a context factory with
:meth:`add_forward_context`; it is entered around every forward (and its backward, so that
gradient-checkpointing recomputation happens inside it).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lit_moe_rl.algorithms import GRPO, Algorithm
from lit_moe_rl.batch import Rollout
from lit_moe_rl.corrections import apply_correction
from lit_moe_rl.losses import aggregate, kl_estimate, masked_mean
from lit_moe_rl.metrics import extreme_token_fraction, logp_diff_stats, train_infer_kl
from lit_moe_rl.policy import load_balancing_loss, load_policy, token_logprobs
from lit_moe_rl.routing.checks import require_moe
from lit_moe_rl.routing.record import capture_router_logits, gather_router_logp
from lit_moe_rl.routing.shift import router_shift, shift_stats, topk_set_changed

Phase = Literal["old", "update", "ref"]
ForwardContext = Callable[[Phase, Rollout], contextlib.AbstractContextManager]


class MoERLModule(L.LightningModule):
    """Holds the MoE policy and the RL objective; optimises it manually, several updates per rollout."""

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        algorithm: Algorithm | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        mini_batches: int = 1,
        micro_batch_size: int = 16,
        grad_clip: float = 1.0,
        logprob_chunk_size: int = 256,
        gradient_checkpointing: bool = False,
        router_aux_loss_coef: float = 0.0,
        lora: dict[str, Any] | None = None,
        correction: Literal[
            "none", "token_tis", "seq_tis", "icepop", "token_rejection", "geo_rejection"
        ] = "none",
        correction_args: dict[str, float] | None = None,
        track_router_shift: bool = False,
        old_logp_pass: Literal["auto", "always"] = "auto",
    ) -> None:
        """
        Args:
            pretrained: Local folder of a HF MoE checkpoint, or ``builtin:<name>`` for a shipped one.
            config: Inline config to build a random model: ``{family: qwen3_moe, ...}`` or a HF config dict.
            tokenizer: Tokenizer folder (default: ``pretrained``; the char tokenizer for ``config``).
            dtype: Training weights' dtype.
            algorithm: GRPO-family algorithm (``class_path`` in YAML); default GRPO().
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: Linear learning-rate warm-up, in optimizer steps.
            mini_batches: Optimizer updates per rollout (1 = on-policy).
            micro_batch_size: Sequences per forward; gradients accumulate over a mini-batch.
            grad_clip: Max global gradient norm (0 = no clipping).
            logprob_chunk_size: Response positions per LM-head chunk when computing log-probs.
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            router_aux_loss_coef: Load-balancing aux loss weight during RL (0 = off, as in R3). Under
                routing replay HF's aux loss still sees the router's native top-K, not the replayed ids.
            lora: LoRA settings passed to ``peft.LoraConfig`` (None = full fine-tuning).
            correction: Off-policy correction on rho = pi_old / mu (docs/algorithms.md §2.7-2.8).
            correction_args: Its parameters, e.g. ``{cap: 2.0}`` for TIS, ``{alpha: 0.5, beta: 5.0}`` for IcePop.
            old_logp_pass: ``auto`` skips the separate π_old forward when it is provably redundant (one
                mini-batch, no replay, no router-shift tracking, no reference model, no correction): the
                update's own forward, detached, is π_old (the ratio is exactly 1). ``always`` recomputes.
            track_router_shift: Measure RSPO's router shift (``rspo/*``) even when the algorithm does not
                weight by it (RouterShiftCallback turns this on).
        """
        super().__init__()
        if pretrained is None and config is None:
            raise ValueError("model: set model.pretrained (a local folder or builtin:<name>) or model.config")
        if mini_batches < 1:
            raise ValueError(f"model.mini_batches: must be >= 1, got {mini_batches}")
        if micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size: must be >= 1, got {micro_batch_size}")
        from lit_moe_rl.validation import check_module_settings  # ranges: lit_moe_rl/validation.py

        check_module_settings(
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_steps=warmup_steps,
            grad_clip=grad_clip,
            logprob_chunk_size=logprob_chunk_size,
            router_aux_loss_coef=router_aux_loss_coef,
            lora=lora,
        )
        if pretrained is not None:
            from lit_moe_rl.policy import resolve_pretrained

            resolve_pretrained(pretrained)  # fail before any work on a missing folder
        check_correction(correction, correction_args or {})
        self.save_hyperparameters(ignore=["algorithm"])
        self.algorithm = algorithm if algorithm is not None else GRPO()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._forward_contexts: list[ForwardContext] = []
        self.reference: Any = None  # set by ReferenceKLCallback: provides reference_logprobs(module, micro)
        self.skipped_steps = 0
        self._aux_loss: Any = None  # the family's load-balancing loss when router_aux_loss_coef > 0
        self._fused_old: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, logp, entropy) of a fused pass

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Load the policy (idempotent; runs under the strategy's init context, e.g. FSDP)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.tokenizer = load_policy(
            hp.pretrained, hp.config, dtype=hp.dtype, tokenizer=hp.tokenizer, seed=torch.initial_seed()
        )
        if hp.lora:
            from peft import LoraConfig, get_peft_model

            self.policy = get_peft_model(self.policy, LoraConfig(**hp.lora))
        if self.tracks_router_shift:
            require_moe(self.policy, "router_shift")
        self._aux_loss = load_balancing_loss(self.policy) if hp.router_aux_loss_coef > 0 else None
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False

    def on_fit_start(self) -> None:
        """Fail before the first rollout on a KL term without a reference (callbacks' hooks ran first)."""
        if self.algorithm.kl_coef > 0 and self.reference is None:
            raise ValueError(
                "algorithm.kl_coef: > 0 needs a reference model: add lit_moe_rl.callbacks.ReferenceKLCallback"
            )

    def add_forward_context(self, factory: ForwardContext) -> None:
        """Register ``factory(phase, micro_rollout)``, entered around every policy forward."""
        self._forward_contexts.append(factory)

    @contextlib.contextmanager
    def forward_context(self, phase: Phase, micro: Rollout) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for factory in self._forward_contexts:
                stack.enter_context(factory(phase, micro))
            yield

    def sequence_logprobs(
        self, micro: Rollout, *, with_entropy: bool = False, router_logits: bool = False
    ) -> tuple[Tensor, Tensor | None, Any]:
        """Per-token log-probs ``[n, R]`` of ``micro``'s response tokens under the current policy,
        their entropies (when asked) and the decoder outputs (``router_logits`` when asked)."""
        extra = {"output_router_logits": True} if router_logits else {}
        return token_logprobs(
            self.policy,
            micro.input_ids,
            micro.attention_mask,
            micro.prompt_len,
            temperature=micro.temperature,
            chunk_size=self.hparams.logprob_chunk_size,
            with_entropy=with_entropy,
            **extra,
        )

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        warmup = max(hp.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = batch.get("rollout")
        if rollout is None:
            raise RuntimeError(
                "batch has no 'rollout': add lit_moe_rl.callbacks.RolloutCallback to trainer.callbacks"
            )
        metrics = dict(rollout.extras)
        if rollout.num_sequences == 0:  # DAPO dropped every group: a step with no gradient, still counted
            self.skipped_steps += 1
            self.optimizers().step()
            self.lr_schedulers().step()
            metrics["policy/skipped_steps"] = float(self.skipped_steps)
            self.log_dict(metrics, batch_size=1)
            return
        t0 = time.perf_counter()
        rollout = rollout.to(self.device, skip=("routes", "old_routes", "old_router_logp"))
        batch["rollout"] = rollout  # callbacks' on_train_batch_end sees old_logp, old_topk, ...
        if self.fuses_old_pass:
            metrics.update(self.policy_update(rollout))
            metrics.update(self.collect_fused_old_logprobs(rollout))
        else:
            metrics.update(self.compute_old_logprobs(rollout))
            metrics.update(self.policy_update(rollout))
        update_s = time.perf_counter() - t0
        metrics["perf/update_s"] = update_s
        tokens = float(rollout.attention_mask.sum())
        metrics["perf/tokens_per_s"] = tokens / max(update_s + metrics.get("perf/rollout_s", 0.0), 1e-9)
        self.log_dict(metrics, batch_size=rollout.num_sequences)

    def micro_batches(self, rows: Tensor) -> list[Tensor]:
        return list(rows.split(self.hparams.micro_batch_size))

    @property
    def fuses_old_pass(self) -> bool:
        """True when π_old can be read off the (single) update forward instead of a separate pass."""
        hp = self.hparams
        return (
            hp.old_logp_pass == "auto"
            and hp.mini_batches == 1
            and not self._forward_contexts
            and not self.tracks_router_shift
            and self.reference is None
            and hp.correction == "none"
        )

    def collect_fused_old_logprobs(self, rollout: Rollout) -> dict[str, float]:
        """π_old from the update forward (detached, taken before the step) into ``rollout``, and its metrics."""
        rows = torch.cat([r for r, _, _ in self._fused_old]).to(rollout.response_mask.device)
        old = torch.empty_like(rollout.response_mask, dtype=torch.float32)
        entropy = torch.empty_like(old)
        old[rows] = torch.cat([lp for _, lp, _ in self._fused_old]).float()
        entropy[rows] = torch.cat([e for _, _, e in self._fused_old]).float()
        self._fused_old.clear()
        rollout.old_logp = old
        return self.old_pass_metrics(rollout, entropy)

    @property
    def tracks_router_shift(self) -> bool:
        return self.algorithm.router_shift or self.hparams.track_router_shift

    def _router_capture(self, micro: Rollout) -> contextlib.AbstractContextManager:
        """Capture router log-probs at the positions predicting response tokens (RSPO), or nothing."""
        if not self.tracks_router_shift:
            return contextlib.nullcontext()
        return capture_router_logits(self.policy, positions=slice(micro.prompt_len - 1, -1))

    @torch.no_grad()
    def compute_old_logprobs(self, rollout: Rollout) -> dict[str, float]:
        """π_old log-probs (and entropies) of every response token, once per rollout, into ``rollout``.

        With router-shift tracking on, also the old top-K expert ids and their router log-probs at the
        positions that predict each response token (RSPO, docs/algorithms.md §4.4).
        """
        self.policy.eval()
        old, ent, topk, router_logp, ref = [], [], [], [], []
        for rows in self.micro_batches(torch.arange(rollout.num_sequences)):
            micro = rollout.select(rows)
            with self.forward_context("old", micro), self._router_capture(micro) as cap:
                logp, entropy, _ = self.sequence_logprobs(micro, with_entropy=True)
            old.append(logp)
            ent.append(entropy)
            if self.reference is not None:
                ref.append(self.reference.reference_logprobs(self, micro))
            if cap is not None:
                topk.append(cap.topk.cpu())
                router_logp.append(gather_router_logp(cap.router_logp, cap.topk).cpu())
        self.policy.train()
        rollout.old_logp = torch.cat(old)
        if topk:
            rollout.old_topk, rollout.old_router_logp = torch.cat(topk), torch.cat(router_logp)
        if ref:
            rollout.ref_logp = torch.cat(ref)
        metrics = self.old_pass_metrics(rollout, torch.cat(ent))
        if rollout.infer_logp is not None:
            metrics.update(self.apply_correction(rollout))
        return metrics

    def old_pass_metrics(self, rollout: Rollout, entropy: Tensor) -> dict[str, float]:
        """``policy/entropy`` of π_old, ``ref/kl`` and the train-inference ``mismatch/*`` metrics."""
        mask = rollout.response_mask
        metrics = {"policy/entropy": float(masked_mean(entropy, mask))}
        if rollout.ref_logp is not None:
            kl = kl_estimate(rollout.old_logp, rollout.ref_logp, "k3", mask=mask)
            metrics["ref/kl"] = float(masked_mean(kl, mask))
        if rollout.infer_logp is not None:
            metrics.update(mismatch_metrics(rollout.old_logp, rollout.infer_logp, mask))
        return metrics

    def apply_correction(self, rollout: Rollout) -> dict[str, float]:
        """Off-policy correction weights on ρ = π_old/μ into ``rollout.token_weight``."""
        kind = self.hparams.correction
        if kind == "none":
            return {}
        weight, stats = apply_correction(
            kind,
            rollout.old_logp,
            rollout.infer_logp,
            rollout.response_mask,
            **(self.hparams.correction_args or {}),
        )
        rollout.token_weight = weight
        return {f"mismatch/{key}": float(value) for key, value in stats.items()}

    def policy_update(self, rollout: Rollout) -> dict[str, float]:
        """``mini_batches`` optimizer steps over shuffled slices of the rollout."""
        gen = torch.Generator().manual_seed(self.global_step)  # same order on resume
        order = torch.randperm(rollout.num_sequences, generator=gen)
        totals: dict[str, list[float]] = defaultdict(list)
        for rows in order.tensor_split(self.hparams.mini_batches):
            if len(rows) == 0:
                continue
            for key, value in self.mini_batch_step(rollout, rows).items():
                totals[key].append(value)
        metrics = {key: sum(v) / len(v) for key, v in totals.items()}
        metrics["policy/skipped_steps"] = float(self.skipped_steps)
        metrics["policy/lr"] = self.optimizers().param_groups[0]["lr"]
        return metrics

    def mini_batch_step(self, rollout: Rollout, rows: Tensor) -> dict[str, float]:
        """Accumulate gradients over the micro-batches of ``rows``, clip, step (or skip if non-finite)."""
        opt = self.optimizers()
        mask = rollout.response_mask[rows.to(rollout.response_mask.device)]
        norms = dict(
            num_tokens=float(mask.sum()),
            num_seqs=float(len(rows)),
            norm_const=float(rollout.max_response_len or mask.shape[1]),
        )
        stats: dict[str, float] = defaultdict(float)
        finite = True
        for micro_rows in self.micro_batches(rows):
            micro = rollout.select(micro_rows)
            with self.forward_context("update", micro), self._router_capture(micro) as cap:
                loss, micro_stats = self.micro_batch_loss(micro, cap, **norms)
                finite = finite and bool(torch.isfinite(loss))
                if finite:
                    self.manual_backward(loss)
            weight = len(micro_rows) / len(rows)
            stats["policy/loss"] += float(loss.detach())
            for key, value in micro_stats.items():
                stats[key if "/" in key else f"policy/{key}"] += float(value) * weight
        grad_norm = self.clip_and_measure()
        if not (finite and math.isfinite(grad_norm)):
            # Drop the gradients: the optimizer skips parameters whose grad is None, so this step
            # leaves weights and optimizer state untouched yet still counts (trainer.max_steps ends the run).
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        opt.step()
        self.lr_schedulers().step()
        opt.zero_grad(set_to_none=True)
        stats["policy/grad_norm"] = grad_norm
        return dict(stats)

    def micro_batch_loss(
        self, micro: Rollout, capture: Any, *, num_tokens: float, num_seqs: float, norm_const: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The algorithm's loss on one micro-batch, normalised by the mini-batch's global counts."""
        fused = self.fuses_old_pass
        logp, entropy, out = self.sequence_logprobs(
            micro, with_entropy=fused, router_logits=self._aux_loss is not None
        )
        if fused:  # the single update forward is pi_old: ratio exactly 1, as on the first mini-batch
            old_logp = logp.detach()
            self._fused_old.append((micro.rows, old_logp, entropy))
        else:
            old_logp = micro.require("old_logp", "the module's old-log-prob pass")
        log_weight, shift_metrics = self.router_shift_weight(micro, capture)
        loss, stats = self.algorithm.objective(
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
        if self.algorithm.kl_coef > 0:
            ref_logp = micro.require("ref_logp", "lit_moe_rl.callbacks.ReferenceKLCallback")
            kl = kl_estimate(logp, ref_logp, self.algorithm.kl_kind, mask=micro.response_mask)
            kl_loss = aggregate(kl, micro.response_mask, "token-mean", num_tokens=num_tokens)
            loss = loss + self.algorithm.kl_coef * kl_loss
            stats["kl_loss"] = kl_loss.detach()
        if self._aux_loss is not None:  # a micro-batch mean, weighted by its share of the mini-batch
            aux = self._aux_loss(out.router_logits, micro.attention_mask)
            loss = loss + self.hparams.router_aux_loss_coef * aux * (micro.num_sequences / num_seqs)
            stats["aux_loss"] = aux.detach()
        return loss, stats | shift_metrics

    def router_shift_weight(self, micro: Rollout, capture: Any) -> tuple[Tensor | None, dict[str, Tensor]]:
        """RSPO's ``log γ̃`` ``[n, R]`` (None unless the algorithm weights by it) and its ``rspo/`` stats.

        ``γ`` compares the current router log-probs with the old ones at the old top-K experts
        (:func:`lit_moe_rl.routing.shift.router_shift`, arXiv 2510.23027 v2); it is floored and detached.
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
            floor=self.algorithm.router_shift_floor,
            layer_reduce=self.algorithm.router_shift_layer_reduce,
        )
        stats = shift_stats(shift, mask, self.algorithm.router_shift_floor)
        layer_shift = stats.pop("layer_shift")
        metrics = {f"rspo/{key}": value for key, value in stats.items()}
        metrics |= {f"rspo/layer_shift/{layer}": value for layer, value in enumerate(layer_shift)}
        changed = topk_set_changed(old_ids.to(device), capture.topk, valid=mask)
        metrics |= {f"rspo/{key}": value for key, value in changed.items()}
        log_weight = shift.gamma.log() if self.algorithm.router_shift else None
        return log_weight, metrics

    def clip_and_measure(self) -> float:
        """Clip the global gradient norm to ``grad_clip`` and return the norm before clipping."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else float("inf")
        clip = getattr(self.policy, "clip_grad_norm_", None)  # FSDP1 exposes its own sharded version
        norm = clip(max_norm) if callable(clip) else torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    # ------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rewards = batch.get("val_rewards")
        if rewards is None:
            raise RuntimeError("batch has no 'val_rewards': add lit_moe_rl.callbacks.RolloutCallback")
        self.log("val/reward", rewards.float().mean(), batch_size=len(rewards), prog_bar=True)

    # ------------------------------------------------------------ export
    def save_hf(self, path: str) -> None:
        """Save the policy (LoRA merged) and tokenizer as a Hugging Face folder ``from_pretrained`` loads."""
        model = self.policy
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


TAUS = (1.5, 2.0, 5.0, 10.0)


def mismatch_metrics(train_logp: Tensor, infer_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """``mismatch/*``: train-inference KL (R3 Eq. 2), extreme-token fractions (Eq. 3), |Δ log p|."""
    metrics = {"mismatch/train_infer_kl": float(train_infer_kl(train_logp, infer_logp, mask))}
    for tau in TAUS:
        metrics[f"mismatch/extreme_frac_tau{tau:g}"] = float(
            extreme_token_fraction(train_logp, infer_logp, mask, tau)
        )
    for key, value in logp_diff_stats(train_logp, infer_logp, mask).items():
        metrics[f"mismatch/{key}"] = float(value)
    return metrics


def check_correction(kind: str, args: dict[str, float]) -> None:
    """Fail at start-up on an unknown correction or bad parameters, not at the first step."""
    from lit_moe_rl.corrections import CORRECTIONS

    if kind not in CORRECTIONS:
        raise ValueError(f"model.correction: unknown {kind!r}; choose one of {', '.join(CORRECTIONS)}")
    zeros = torch.zeros(1, 1)
    try:
        apply_correction(kind, zeros, zeros, torch.ones(1, 1, dtype=torch.bool), **args)
    except TypeError as err:
        raise ValueError(f"model.correction_args: {err}") from None
