"""The LightningModule: a thin adapter over :class:`~lit_moe_rl.learner.Learner`.

It builds the policy (``configure_model``) and the optimizer, hands each rollout that
:class:`~lit_moe_rl.callbacks.rollout.RolloutCallback` put into the batch to the learner
(``training_step``), logs what the learner returns, and saves, restores and exports. No RL math here:
the step, its statistics and their reduction across ranks live in :mod:`lit_moe_rl.learner`.
Optimisation is manual (several updates per rollout); Lightning's wrapped optimizer and
``manual_backward`` are the learner's ``optimizer`` and ``backward``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_moe_rl.algorithms import GRPO, Algorithm
from lit_moe_rl.distributed import Collectives
from lit_moe_rl.learner import ForwardContext, Learner, LearnerSettings, Stats, add_named
from lit_moe_rl.learner.old_pass import check_correction
from lit_moe_rl.lora import apply_lora
from lit_moe_rl.policy import load_balancing_loss, load_policy, set_training_mode
from lit_moe_rl.routing.checks import require_moe
from lit_moe_rl.sharding import RolloutCopy, data_parallel_mesh, refuse_fsdp1, shard_policy
from lit_moe_rl.validation import check_module_settings


class MoERLModule(L.LightningModule):
    """Holds the MoE policy and its learner; optimises it manually, several updates per rollout."""

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
        logprob_chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
        router_aux_loss_coef: float = 0.0,
        lora: dict[str, Any] | None = None,
        correction: Literal[
            "none", "token_tis", "seq_tis", "icepop", "token_rejection", "geo_rejection"
        ] = "none",
        correction_args: dict[str, float] | None = None,
        track_router_shift: bool = False,
        old_logp_pass: Literal["auto", "always"] = "auto",
        trim_padding: bool = True,
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
            logprob_chunk_size: Response tokens (across rows) per LM-head chunk when computing log-probs:
                bounds the fp32 logits alive at once to ``[logprob_chunk_size, V]``; padding is skipped.
                Default (null): 32 MiB of logits on CPU, 1 GiB on a GPU (``policy.logprob_chunk_tokens``).
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            router_aux_loss_coef: Load-balancing aux loss weight during RL (0 = off, as in R3). Under
                routing replay HF's aux loss still sees the router's native top-K, not the replayed ids.
            lora: LoRA through PEFT (None = full fine-tuning): ``rank``, ``alpha``, ``dropout``,
                ``target_modules`` (Linear modules), ``target_parameters`` (fused expert tensors, e.g.
                ``mlp.experts.gate_up_proj``), ``router``: frozen, full or adapted (:mod:`lit_moe_rl.lora`).
            correction: Off-policy correction on rho = pi_old / mu (docs/algorithms.md §2.7-2.8).
            correction_args: Its parameters, e.g. ``{cap: 2.0}`` for TIS, ``{alpha: 0.5, beta: 5.0}`` for IcePop.
            old_logp_pass: ``auto`` skips the separate π_old forward when it is provably redundant (one
                mini-batch, no replay, no router-shift tracking, no reference model, no correction): the
                update's own forward, detached, is π_old (the ratio is exactly 1). ``always`` recomputes.
            trim_padding: Group micro-batches by response length and drop each one's all-padding
                response columns (same loss and gradients up to float rounding; off under routing replay).
            track_router_shift: Measure RSPO's router shift (``rspo/*``) even when the algorithm does not
                weight by it (RouterShiftCallback turns this on).
        """
        super().__init__()
        if pretrained is None and config is None:
            raise ValueError("model: set model.pretrained (a local folder or builtin:<name>) or model.config")
        for name, value in (("mini_batches", mini_batches), ("micro_batch_size", micro_batch_size)):
            if value < 1:
                raise ValueError(f"model.{name}: must be >= 1, got {value}")
        check_module_settings(
            lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, grad_clip=grad_clip,
            logprob_chunk_size=logprob_chunk_size, router_aux_loss_coef=router_aux_loss_coef, lora=lora,
        )  # fmt: skip
        if pretrained is not None:
            from lit_moe_rl.policy import resolve_pretrained

            resolve_pretrained(pretrained)  # fail before any work on a missing folder
        check_correction(correction, correction_args or {})
        self.save_hyperparameters(ignore=["algorithm"])
        self.algorithm = algorithm if algorithm is not None else GRPO()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.learner: Learner | None = None  # built with the policy (configure_model)
        self.forward_contexts: list[ForwardContext] = []  # registered by callbacks, shared with the learner
        self.init_seed = 0  # the seed configure_model built the policy with (kept in checkpoints)
        self.rollout_copy: RolloutCopy | None = None  # a sharded policy's full copy for generation

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        """Refuse Lightning's FSDP v1 before the model is built (a Trainer made in Python skips the CLI)."""
        if getattr(self, "_trainer", None) is not None:
            refuse_fsdp1(self.trainer.strategy)

    def configure_model(self) -> None:
        """Load the policy and build its learner (idempotent; runs under the strategy's init context)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.init_seed = torch.initial_seed()
        self.policy, self.tokenizer = load_policy(
            hp.pretrained, hp.config, dtype=hp.dtype, tokenizer=hp.tokenizer, seed=self.init_seed
        )
        if hp.lora:
            self.policy = apply_lora(self.policy, hp.lora)
            self.strict_loading = not self.saves_adapters_only  # the base comes from model.pretrained
        if self.algorithm.router_shift or hp.track_router_shift:
            require_moe(self.policy, "router_shift")
        if hp.router_aux_loss_coef > 0:
            load_balancing_loss(self.policy)  # fails now on a family without one
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False
        zeroed = set_training_mode(self.policy)  # the one mode of every forward; the engine toggles its own
        if zeroed:
            rank_zero_warn(f"model: {zeroed} dropout/noise probabilities set to 0 (RL trains without dropout)")
        mesh = data_parallel_mesh(self)
        if mesh is not None:  # FSDP2 (ModelParallelStrategy): keep a full copy to generate with, then shard
            self.rollout_copy = RolloutCopy(self.policy)
            shard_policy(self.policy, mesh)
        settings = LearnerSettings.from_hparams(hp)
        self.learner = Learner(self.policy, self.algorithm, settings, forward_contexts=self.forward_contexts)

    def add_forward_context(self, factory: ForwardContext) -> None:
        """Register ``factory(phase, micro_rollout)``, entered around every policy forward (before or after
        ``configure_model``: the learner shares this list)."""
        self.forward_contexts.append(factory)

    def rollout_policy(self) -> torch.nn.Module:
        """The module the rollout engine generates with: the policy, or its full copy when sharded."""
        return self.rollout_copy.get(self.policy, self.device) if self.rollout_copy else self.policy

    def sync_rollout_policy(self) -> torch.nn.Module:
        """Refresh the full rollout copy of a sharded policy (a collective) and return :meth:`rollout_policy`."""
        return self.rollout_copy.sync(self.policy, self.device) if self.rollout_copy else self.policy

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        warmup = max(hp.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Give the learner Lightning's optimizer, backward and device (callbacks' hooks ran first), and
        fail before the first rollout on a KL term without a reference."""
        learner = self.learner
        learner.optimizer, learner.scheduler = self.optimizers(), self.lr_schedulers()
        learner.backward = self.manual_backward
        learner.collectives = Collectives(self.device)
        block = getattr(self.trainer.strategy, "block_backward_sync", None)  # DDP's no_sync
        learner.no_sync = block if callable(block) else None
        if self.algorithm.kl_coef > 0 and learner.reference is None:
            raise ValueError(
                "algorithm.kl_coef: > 0 needs a reference model: add lit_moe_rl.callbacks.ReferenceKLCallback"
            )

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = batch.get("rollout")
        if rollout is None:
            raise RuntimeError(
                "batch has no 'rollout': add lit_moe_rl.callbacks.RolloutCallback to trainer.callbacks"
            )
        if self.learner.collectives.sum(0.0 if rollout.placeholder else float(rollout.num_sequences)) > 0:
            rollout = rollout.to(self.device, skip=("routes", "old_routes", "old_router_logp"))
        else:
            rollout = rollout.select(torch.arange(0))  # every group dropped on every rank: a skipped step
        batch["rollout"] = rollout  # callbacks' on_train_batch_end sees old_logp, old_topk, ...
        metrics = self.learner.step(rollout, optimizer_step=self.global_step)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def log_reduced(self, metrics: dict[str, Any]) -> None:
        """Log callbacks' per-rank metrics reduced across ranks by name
        (:func:`~lit_moe_rl.distributed.reduction_of`; token means weighted by this step's response
        tokens). Every rank must call it at the same point: callbacks call it from ``on_train_batch_end``."""
        stats = Stats()
        add_named(stats, metrics, self.learner.step_tokens)
        self.log_dict(stats.reduce(self.learner.collectives), on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rewards = batch.get("val_rewards")
        if rewards is None:
            raise RuntimeError("batch has no 'val_rewards': add lit_moe_rl.callbacks.RolloutCallback")
        # on the module's device: sync_dist all-reduces it, and NCCL cannot reduce a CPU tensor
        mean = rewards.float().mean().to(self.device)
        self.log("val/reward", mean, batch_size=len(rewards), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------ checkpoints and export
    @property
    def skipped_steps(self) -> int:
        return self.learner.skipped_steps if self.learner is not None else 0

    def initial_policy(self) -> torch.nn.Module:
        """The policy as :meth:`configure_model` first built it (same source, same seed), without LoRA,
        on this module's device, and sharded like the policy under FSDP2."""
        hp = self.hparams
        policy, _ = load_policy(hp.pretrained, hp.config, dtype=hp.dtype, tokenizer=hp.tokenizer, seed=self.init_seed)
        policy.config.use_cache = False
        policy.to(self.device)
        mesh = data_parallel_mesh(self)
        return shard_policy(policy, mesh) if mesh is not None else policy

    @property
    def saves_adapters_only(self) -> bool:
        """LoRA on a model loaded from ``model.pretrained``: the frozen base weights are not saved (the
        checkpoint holds the adapters, a ``full`` router and the optimizer); a resume reloads the base."""
        return bool(self.hparams.lora) and self.hparams.pretrained is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["init_seed"] = self.init_seed
        if self.saves_adapters_only and "state_dict" in checkpoint:
            trained = {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.learner.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.init_seed = checkpoint.get("init_seed", self.init_seed)

    def save_hf(self, path: str) -> None:
        """Save the policy (LoRA merged) and tokenizer as a Hugging Face folder ``from_pretrained`` loads.
        A sharded policy is saved from its full rollout copy (refreshed after every optimizer step)."""
        model = self.rollout_policy()
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
