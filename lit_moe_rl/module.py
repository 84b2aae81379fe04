"""The LightningModule: a thin adapter over :class:`~lit_moe_rl.learner.Learner`. It builds the policy and
the optimizer, hands the rollout :class:`~lit_moe_rl.callbacks.rollout.RolloutCallback` put into the batch
to the learner, logs what it returns, saves, restores and exports. Optimisation is manual (several updates
per rollout): Lightning's wrapped optimizer and ``manual_backward`` are the learner's."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_moe_rl import ckpt_match
from lit_moe_rl.algorithms import GRPO, Algorithm
from lit_moe_rl.learner import ForwardContext, Learner, LearnerSettings, Stats, add_named
from lit_moe_rl.learner.optim import adamw_with_warmup
from lit_moe_rl.learner.settings import CorrectionKind
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.parallel.sharding import RolloutCopy, data_parallel_mesh, refuse_fsdp1, shard_policy
from lit_moe_rl.policy import build_rl_policy, initial_policy, save_hf_folder
from lit_moe_rl.validation import check_rl_module_settings


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
        correction: CorrectionKind = "none",
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
            logprob_chunk_size: Response tokens per LM-head chunk (null: 32 MiB of fp32 logits on CPU, 1 GiB on GPU).
            gradient_checkpointing: Recompute decoder activations in the backward pass.
            router_aux_loss_coef: Load-balancing aux loss weight (0 = off, as in R3; sees the native top-K).
            lora: LoRA through PEFT (None = full fine-tuning): rank, alpha, targets, router (lit_moe_rl/lora.py).
            correction: Off-policy correction on rho = pi_old / mu (docs/algorithms.md §2.7-2.8).
            correction_args: Its parameters, e.g. ``{cap: 2.0}`` (TIS), ``{alpha: 0.5, beta: 5.0}`` (IcePop).
            old_logp_pass: ``auto``: π_old read off the update forward when exact (``Learner.fuses_old_pass``).
            trim_padding: Sort micro-batches by length and drop all-padding columns (off under routing replay).
            track_router_shift: Log RSPO's router shift (``rspo/*``) for any algorithm (RouterShiftCallback).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["algorithm"])
        check_rl_module_settings(self.hparams)  # ranges and sources: lit_moe_rl/validation.py
        self.algorithm = algorithm if algorithm is not None else GRPO()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.learner: Learner | None = None  # built with the policy (configure_model)
        self.forward_contexts: list[ForwardContext] = []  # registered by callbacks, shared with the learner
        self.init_seed = 0  # the seed configure_model built the policy with (kept in checkpoints)
        self.rollout_copy: RolloutCopy | None = None  # a sharded policy's full copy for generation

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
        shift = self.algorithm.router_shift or hp.track_router_shift
        self.policy, self.tokenizer, zeroed = build_rl_policy(hp, seed=self.init_seed, router_shift=shift)
        # LoRA on model.pretrained saves only the adapters: a resume reloads the base
        self.strict_loading = not ckpt_match.saves_adapters_only(hp)
        if zeroed:  # the one mode of every forward; the engine toggles its own
            rank_zero_warn(
                f"model: {zeroed} dropout/noise probabilities set to 0 (RL trains without dropout)"
            )
        mesh = data_parallel_mesh(self)
        if mesh is not None:  # FSDP2 (ModelParallelStrategy): keep a full copy to generate with, then shard
            self.rollout_copy = RolloutCopy(self.policy)
            shard_policy(self.policy, mesh)
        settings = LearnerSettings.from_hparams(hp)
        self.learner = Learner(self.policy, self.algorithm, settings, forward_contexts=self.forward_contexts)

    def add_forward_context(self, factory: ForwardContext) -> None:
        """Register ``factory(phase, micro)``, entered around every policy forward (the learner shares the list)."""
        self.forward_contexts.append(factory)

    def rollout_policy(self) -> torch.nn.Module:
        """The module the rollout engine generates with: the policy, or its full copy when sharded."""
        return self.rollout_copy.get(self.policy, self.device) if self.rollout_copy else self.policy

    def sync_rollout_policy(self) -> torch.nn.Module:
        """Refresh a sharded policy's full rollout copy (a collective) and return :meth:`rollout_policy`."""
        return self.rollout_copy.sync(self.policy, self.device) if self.rollout_copy else self.policy

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt, sched = adamw_with_warmup(
            self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
            warmup_steps=hp.warmup_steps,
        )  # fmt: skip
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Give the learner Lightning's optimizer, backward and device (callbacks' hooks ran first), and
        fail before the first rollout on a KL term without a reference."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)  # DDP's no_sync
        self.learner.bind(
            self.optimizers(), self.lr_schedulers(), backward=self.manual_backward,
            collectives=Collectives(self.device), no_sync=block if callable(block) else None,
        )  # fmt: skip
        if self.algorithm.kl_coef > 0 and self.learner.reference is None:
            raise ValueError(
                "algorithm.kl_coef: > 0 needs a reference model: add lit_moe_rl.callbacks.ReferenceKLCallback"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = batch.get("rollout")
        if rollout is None:
            raise RuntimeError(
                "batch has no 'rollout': add lit_moe_rl.callbacks.RolloutCallback to trainer.callbacks"
            )
        batch["rollout"] = rollout = self.learner.prepare(rollout)  # callbacks then see old_logp, old_topk...
        self.log_step(self.learner.step(rollout, optimizer_step=self.global_step))

    def log_reduced(self, metrics: dict[str, Any]) -> None:
        """Log callbacks' per-rank metrics reduced across ranks by name (``distributed.reduction_of``; token
        means by this step's tokens). Every rank calls it at the same point (``on_train_batch_end``)."""
        stats = Stats()
        add_named(stats, metrics, self.learner.step_tokens)
        self.log_step(stats.reduce(self.learner.collectives))

    def log_step(self, metrics: dict[str, float]) -> None:
        """Log ``metrics`` on one step axis (README "Metrics"): the optimizer step count after the row's update,
        as ``max_steps``, checkpoints and the summary count (Lightning's own counts rollouts). Logged from the
        step itself, so that a checkpoint saved in ``on_train_batch_end`` is named by this step."""
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self._trainer is None:  # not run by a Trainer: no step to log
            return
        if self.trainer.state.stage == "train":  # Lightning adds the epoch only on its own axis
            self.log_dict({"step": float(self.global_step), "epoch": float(self.current_epoch)}, batch_size=1)
        else:  # validation: an epoch value, the same on every rank
            self.log("step", float(self.global_step), batch_size=1, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rewards = batch.get("val_rewards")
        if rewards is None:
            raise RuntimeError("batch has no 'val_rewards': add lit_moe_rl.callbacks.RolloutCallback")
        # on the module's device: sync_dist all-reduces it, and NCCL cannot reduce a CPU tensor
        mean = rewards.float().mean().to(self.device)
        self.log("val/reward", mean, batch_size=len(rewards), prog_bar=True, sync_dist=True)
        self.log_step({})

    def initial_policy(self) -> torch.nn.Module:
        """The policy as :meth:`configure_model` first built it, without LoRA (:func:`policy.initial_policy`)."""
        return initial_policy(
            self.hparams, seed=self.init_seed, device=self.device, mesh=data_parallel_mesh(self)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_match.save_module_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_match.load_module_state(self, checkpoint, self._trainer)

    def save_hf(self, path: str) -> None:
        """Save the policy (LoRA merged) and tokenizer as a Hugging Face folder ``from_pretrained`` loads.
        A sharded policy is saved from its full rollout copy (refreshed after every optimizer step)."""
        save_hf_folder(self.rollout_policy(), self.tokenizer, path)
