"""The LightningModule: a thin adapter over :class:`~lit_moe_rl.learner.Learner`. It builds the policy and the
optimizer, hands each rollout to the learner (Lightning's optimizer and ``manual_backward`` become the learner's),
logs what it returns, saves, restores and exports."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import lightning as L
import torch

from lit_moe_rl import ckpt_match, fast_log
from lit_moe_rl.algorithms import GRPO, Algorithm
from lit_moe_rl.compile import parse_torch_compile
from lit_moe_rl.learner import ForwardContext, Learner, LearnerSettings, Stats, add_named
from lit_moe_rl.learner.optim import adamw_with_warmup, param_groups
from lit_moe_rl.learner.settings import CorrectionKind
from lit_moe_rl.parallel import hooks
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.parallel.sharding import RolloutCopy, data_parallel_mesh
from lit_moe_rl.policy import save_hf_folder
from lit_moe_rl.validation import check_rl_module_settings

ADAMW_SETTINGS = ("lr", "weight_decay", "betas", "warmup_steps")


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
        router_lr_scale: float = 1.0,
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
        shared_prefix: Literal["auto", "off"] | bool = "auto",
        skip_padding: bool = True,
        compute_dtype: Literal["bfloat16", "float16"] | None = None,
        rollout_weights: Literal["resident", "unshard"] = "resident",
        offload_optimizer: bool = False,
        memory_check: bool = True,
        torch_compile: bool | dict[str, Any] = False,
        experts_implementation: str = "auto",
    ) -> None:
        """
        Args:
            pretrained: Local folder of a HF MoE checkpoint, or ``builtin:<name>`` for a shipped one.
            config: Inline config to build a random model: ``{family: qwen3_moe, ...}`` or a HF config dict.
            tokenizer: Tokenizer folder (default: ``pretrained``; the char tokenizer for ``config``).
            dtype: Training weights' dtype.
            algorithm: GRPO-family algorithm (``class_path`` in YAML); default GRPO().
            lr: AdamW learning rate.
            router_lr_scale: The MoE routers' learning rate as a multiple of ``lr`` (their own AdamW group).
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
            trim_padding: Sort micro-batches by length and drop all-padding columns (replayed routes with them).
            shared_prefix: ``auto``: the rows of a micro-batch that share a prompt run it once and their
                responses attend to its KV cache (Prefix Grouper, arXiv 2506.05433; lit_moe_rl/learner/prefix.py);
                off under gradient checkpointing, ``torch_compile`` or the router aux loss; ``true`` (YAML's
                ``on``) is ``auto``. ``off`` (or ``false``, which is how YAML reads an unquoted off): every
                row runs its prompt.
            skip_padding: The experts compute only real tokens, not the padding of left-padded prompts
                and right-padded responses (exact: no real token sees a padding token;
                lit_moe_rl/experts.py); needs the ``lit_grouped_mm`` experts kernel (what the default
                ``experts_implementation: auto`` picks), off under gradient checkpointing or
                ``torch_compile``. ``false``: every token.
            track_router_shift: Log RSPO's router shift (``rspo/*``) for any algorithm (RouterShiftCallback).
            compute_dtype: FSDP2 mixed precision: fp32 sharded weights and AdamW state, compute in this dtype.
            rollout_weights: Under FSDP2: ``resident`` full copy to generate with, or ``unshard`` per rollout.
            offload_optimizer: Move AdamW's state to host memory while the rollout generates (bitwise back).
            memory_check: Refuse at start a config the memory planner says cannot fit (``lit-moe-rl plan``).
            torch_compile: ``torch.compile`` the learner's forward/backward: true, or ``{backend, mode, dynamic}``
                (routers stay eager for routing replay; the rollout stays eager; lit_moe_rl/compile.py).
            experts_implementation: The experts kernel, sampling and training alike: ``auto`` (a model on
                transformers' default ``grouped_mm`` gets ``lit_grouped_mm``, the same computation with
                scatter-free row moves and bitwise-equal logits; any other choice of the checkpoint stays;
                lit_moe_rl/experts.py), ``lit_grouped_mm``, or a transformers name (``grouped_mm``, ``eager``,
                ``batched_mm``, ...).
        """
        super().__init__()
        fast_log.install()  # ~30 metrics a step: self.log without re-moving those already on the device
        self.save_hyperparameters(ignore=["algorithm"])
        check_rl_module_settings(self.hparams)  # ranges and sources: lit_moe_rl/validation.py
        parse_torch_compile(torch_compile)  # model.torch_compile: lit_moe_rl/compile.py
        self.algorithm = algorithm if algorithm is not None else GRPO()
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.learner: Learner | None = None  # built with the policy (configure_model)
        self.forward_contexts: list[ForwardContext] = []  # registered by callbacks, shared with the learner
        self.init_seed = 0  # the seed configure_model built the policy with (kept in checkpoints)
        self.rollout_copy: RolloutCopy | None = None  # a sharded policy's full copy for generation
        self.export_state: dict[str, Any] | None = None  # the full weights gather_for_export gathered

    def setup(self, stage: str) -> None:
        """Refuse FSDP v1 and memory settings that cannot work, before the model is built (a Python Trainer too)."""
        if (trainer := getattr(self, "_trainer", None)) is not None:
            hooks.check_strategy(self, trainer)

    def configure_model(self) -> None:
        """Load the policy and build its learner (idempotent; runs under the strategy's init context)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.init_seed, shift = torch.initial_seed(), self.algorithm.router_shift or hp.track_router_shift
        self.policy, self.tokenizer, self.rollout_copy = hooks.build_policy(
            hp, seed=self.init_seed, router_shift=shift, mesh=data_parallel_mesh(self)
        )
        self.strict_loading = not ckpt_match.saves_adapters_only(hp)  # LoRA adapters only: the base reloads
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

    def generation_weights(self) -> contextlib.AbstractContextManager:
        """Around a rollout: the policy unsharded (``rollout_weights: unshard``), the optimizer state offloaded."""
        return hooks.generation_weights(self)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(self.policy, lr=hp.lr, router_lr_scale=hp.get("router_lr_scale", 1.0))
        opt, sched = adamw_with_warmup(groups, **{k: hp[k] for k in ADAMW_SETTINGS})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Give the learner Lightning's optimizer, backward and device; fail on a KL term without a reference."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)  # DDP's no_sync
        self.learner.bind(
            self.optimizers(), self.lr_schedulers(), backward=self.manual_backward,
            collectives=Collectives(self.device), no_sync=block if callable(block) else None,
        )  # fmt: skip
        hooks.warn_low_precision(self)
        if self.algorithm.kl_coef > 0 and self.learner.reference is None:
            raise ValueError(
                "algorithm.kl_coef: > 0 needs a reference model: add lit_moe_rl.callbacks.ReferenceKLCallback"
            )

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one rollout takes (``mini_batches``): ``global_step`` advances by this per batch."""
        return self.learner.settings.mini_batches

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if (rollout := batch.get("rollout")) is None:
            raise RuntimeError("batch has no 'rollout': add lit_moe_rl.callbacks.RolloutCallback")
        batch["rollout"] = rollout = self.learner.prepare(rollout)  # callbacks then see old_logp, old_topk...
        self.log_step(self.learner.step(rollout, optimizer_step=self.global_step))

    def log_reduced(self, metrics: dict[str, Any]) -> None:
        """Log callbacks' per-rank metrics reduced across ranks by name (every rank, ``on_train_batch_end``)."""
        stats = Stats()
        add_named(stats, metrics, self.learner.step_tokens)
        self.log_step(stats.reduce(self.learner.collectives))

    def log_step(self, metrics: dict[str, float]) -> None:
        """Log ``metrics`` on one step axis (README "Metrics"): the optimizer step count, logged with the step so
        that a checkpoint saved in ``on_train_batch_end`` is named by it (Lightning's axis counts rollouts)."""
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self._trainer is None:  # not run by a Trainer: no step to log
            return
        if self.trainer.state.stage == "train":  # Lightning adds the epoch only on its own axis
            self.log_dict({"step": float(self.global_step), "epoch": float(self.current_epoch)}, batch_size=1)
        else:  # validation: an epoch value, the same on every rank
            self.log("step", float(self.global_step), batch_size=1, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if (rewards := batch.get("val_rewards")) is None:
            raise RuntimeError("batch has no 'val_rewards': add lit_moe_rl.callbacks.RolloutCallback")
        mean = rewards.float().mean().to(self.device)  # NCCL (sync_dist) cannot reduce a CPU tensor
        self.log("val/reward", mean, batch_size=len(rewards), prog_bar=True, sync_dist=True)
        self.log_step({})

    def initial_policy(self) -> torch.nn.Module:
        """The policy as :meth:`configure_model` first built it, without LoRA (:func:`hooks.initial_policy`)."""
        return hooks.initial_policy(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_match.save_module_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ckpt_match.load_module_state(self, checkpoint, self._trainer)

    def gather_for_export(self) -> None:
        """Every rank, before rank 0's :meth:`save_hf`: the full weights gathered when no copy holds them."""
        self.export_state = hooks.gather_full_state(self)  # read (once) by save_hf

    def save_hf(self, path: str) -> None:
        """Save the policy (LoRA merged) and tokenizer as a Hugging Face folder (a sharded one: its full copy)."""
        state, self.export_state = self.export_state, None
        model = hooks.export_model(self, state) if state is not None else self.rollout_policy()
        save_hf_folder(model, self.tokenizer, path)
