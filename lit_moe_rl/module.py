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
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_moe_rl import ckpt_match, old_pass, update
from lit_moe_rl.algorithms import GRPO, Algorithm
from lit_moe_rl.batch import Rollout
from lit_moe_rl.batching import trim_padding
from lit_moe_rl.distributed import RankMetrics, global_sum
from lit_moe_rl.lora import apply_lora
from lit_moe_rl.old_pass import check_correction
from lit_moe_rl.parallel.hooks import (
    check_memory_settings,
    export_model,
    gather_full_state,
    generation_weights,
    mixed_precision_policy,
    warn_low_precision,
)
from lit_moe_rl.parallel.rank0_load import full_state, load_on_rank0, loads_on_rank0, receive_shards
from lit_moe_rl.policy import load_balancing_loss, load_policy, set_training_mode, token_logprobs
from lit_moe_rl.routing.checks import require_moe
from lit_moe_rl.routing.record import capture_router_logits
from lit_moe_rl.rspo_weight import router_shift_weight
from lit_moe_rl.sharding import (
    data_parallel_mesh,
    place_full_copy,
    refuse_fsdp1,
    shard_policy,
    sync_full_copy,
    unsharded_copy,
)

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
        compute_dtype: Literal["bfloat16", "float16"] | None = None,
        rollout_weights: Literal["resident", "unshard"] = "resident",
        offload_optimizer: bool = False,
        memory_check: bool = True,
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
            compute_dtype: FSDP2 mixed precision (:mod:`lit_moe_rl.parallel.mixed_precision`): float32
                sharded weights, gradients and AdamW state, forward and backward in this dtype, float32
                gradient reduction. Needs ``trainer.precision: 32-true`` and ``model.dtype: float32``.
            rollout_weights: Under FSDP2, what the rollout generates with: ``resident``, a rank-local full
                copy kept between steps; ``unshard``, the policy itself all-gathered once per rollout and
                resharded before the update (:mod:`lit_moe_rl.parallel.unshard`).
            offload_optimizer: Move AdamW's state to (pinned) host memory while the rollout generates and
                back before the update, bitwise unchanged (:mod:`lit_moe_rl.parallel.offload`).
            memory_check: Refuse at start a configuration the memory planner says cannot fit the detected
                GPU (``lit-moe-rl plan``; :mod:`lit_moe_rl.parallel.plan`); false skips the check.
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
        self.init_seed = 0  # the seed configure_model built the policy with (kept in checkpoints)
        self._aux_loss: Any = None  # the family's load-balancing loss when router_aux_loss_coef > 0
        self._fused_old: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, logp, entropy) of a fused pass
        self.rank_metrics = RankMetrics()
        self._rollout_copy: list[torch.nn.Module] = []  # a sharded policy's full copy for generation
        self._rollout_copy_placement: tuple | None = None  # (device, dtype) place_full_copy matched
        self._export_state: dict[str, Tensor] | None = None  # full weights gathered for save_hf (unshard)

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        """Refuse Lightning's FSDP v1 before the model is built (a Trainer made in Python skips the CLI)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            refuse_fsdp1(trainer.strategy)
            check_memory_settings(self, trainer)

    def configure_model(self) -> None:
        """Load the policy (idempotent; runs under the strategy's init context, e.g. FSDP)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.init_seed = torch.initial_seed()
        mesh = data_parallel_mesh(self)
        rank0 = loads_on_rank0(hp, mesh)  # one host copy per node (lit_moe_rl/parallel/rank0_load.py)
        self.policy, self.tokenizer = (load_on_rank0 if rank0 else load_policy)(
            hp.pretrained, hp.config, dtype=hp.dtype, tokenizer=hp.tokenizer, seed=self.init_seed
        )
        if hp.lora:
            self.policy = apply_lora(self.policy, hp.lora)
            self.strict_loading = not self.saves_adapters_only  # the base comes from model.pretrained
        if self.tracks_router_shift:
            require_moe(self.policy, "router_shift")
        self._aux_loss = load_balancing_loss(self.policy) if hp.router_aux_loss_coef > 0 else None
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False
        zeroed = set_training_mode(self.policy)  # the one mode of every forward; the engine toggles its own
        if zeroed:
            rank_zero_warn(
                f"model: {zeroed} dropout/noise probabilities set to 0 (RL trains without dropout)"
            )
        if mesh is not None:  # FSDP2 (ModelParallelStrategy): keep a full copy to generate with, then shard
            if hp.rollout_weights == "resident":
                self._rollout_copy = [unsharded_copy(self.policy)]  # a list: not a submodule, not checkpointed
            state = full_state(self.policy) if rank0 else None
            shard_policy(self.policy, mesh, mp_policy=mixed_precision_policy(hp.compute_dtype))
            if rank0:
                receive_shards(self.policy, state)

    def rollout_policy(self) -> torch.nn.Module:
        """The module the rollout engine generates with: the policy, or its full copy when sharded
        (refreshed by :meth:`sync_rollout_policy`). The copy is first given the policy's dtypes, buffers
        and device (:func:`~lit_moe_rl.sharding.place_full_copy`): Lightning casts and moves the policy
        after ``configure_model`` took the copy, and an engine binding to it copies what it finds."""
        if not self._rollout_copy:
            return self.policy
        copy = self._rollout_copy[0]
        placement = (self.device, next(self.policy.parameters()).dtype)
        if self._rollout_copy_placement != placement:
            place_full_copy(copy, self.policy, self.device)  # kept out of the module tree, so moved here
            self._rollout_copy_placement = placement
        return copy

    def sync_rollout_policy(self) -> torch.nn.Module:
        """Refresh the full rollout copy of a sharded policy (a collective) and return :meth:`rollout_policy`."""
        if self._rollout_copy:
            sync_full_copy(self.rollout_policy(), self.policy)
        return self.rollout_policy()

    @contextlib.contextmanager
    def generation_weights(self) -> Iterator[torch.nn.Module]:
        """Around a rollout: the policy unsharded (``rollout_weights: unshard``) and the optimizer state off
        the device (``offload_optimizer``); yields :meth:`rollout_policy` (:mod:`lit_moe_rl.parallel`)."""
        with generation_weights(self) as policy:
            yield policy

    def on_fit_start(self) -> None:
        """Fail before the first rollout on a KL term without a reference (callbacks' hooks ran first)."""
        warn_low_precision(self)
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
        real = 0 if rollout.placeholder else rollout.num_sequences
        if global_sum(float(real), self.device) == 0:  # DAPO dropped every group on every rank
            self.skip_step(batch, metrics)
            return
        t0 = self._synced_clock()
        rollout = rollout.to(self.device, skip=("routes", "old_routes", "old_router_logp"))
        batch["rollout"] = rollout  # callbacks' on_train_batch_end sees old_logp, old_topk, ...
        if self.fuses_old_pass:
            metrics.update(self.policy_update(rollout))
            metrics.update(old_pass.collect_fused_old_logprobs(self._fused_old, rollout))
        else:
            metrics.update(self.compute_old_logprobs(rollout))
            metrics.update(self.policy_update(rollout))
        update_s = self._synced_clock() - t0
        metrics["perf/update_s"] = update_s
        tokens = float(rollout.attention_mask.sum())
        metrics["perf/tokens_per_s"] = tokens / max(update_s + metrics.get("perf/rollout_s", 0.0), 1e-9)
        self._step_tokens = 0.0 if rollout.placeholder else float(rollout.response_mask.sum())
        self.log_reduced(metrics)

    def _synced_clock(self) -> float:
        """``time.perf_counter()`` once the device has finished its queued work (CUDA runs kernels
        asynchronously: without the sync ``perf/update_s`` would miss the optimizer step's tail)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def log_reduced(self, metrics: dict[str, Any]) -> None:
        """Log one step's metrics, each reduced across ranks as :func:`~lit_moe_rl.distributed.reduction_of`
        says (token means weighted by this step's response tokens). Every rank must call it at the same
        point: callbacks call it from ``on_train_batch_end``."""
        values = {key: float(value) for key, value in metrics.items()}
        reduced = self.rank_metrics.reduce(values, tokens=self._step_tokens, device=self.device)
        self.log_dict(reduced, on_step=True, on_epoch=False, batch_size=1)
        self.log_step()

    def skip_step(self, batch: dict[str, Any], metrics: dict[str, float]) -> None:
        """A step with no gradient (every group dropped), still counted so that ``max_steps`` ends the run:
        ``mini_batches`` optimizer steps, as an update would take (one step axis, README "Metrics")."""
        batch["rollout"] = batch["rollout"].select(torch.arange(0))
        self.skipped_steps += 1
        for _ in range(self.hparams.mini_batches):
            self.optimizers().step()
            self.lr_schedulers().step()
        metrics["policy/skipped_steps"] = float(self.skipped_steps)
        self._step_tokens = 0.0
        self.log_reduced(metrics)

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.log_step()

    def log_step(self) -> None:
        """One step axis for every logged row (README "Metrics"): the optimizer step count
        (``trainer.global_step``) after the row's update, as ``max_steps``, checkpoints and the summary
        count. Lightning's own axis counts rollouts, one behind after validation and after a resume.
        Logged from the training step itself, so that a checkpoint saved in ``on_train_batch_end`` is
        named by this step, not the previous one (Lightning names it by the logged ``step``)."""
        if self._trainer is None:  # not run by a Trainer: no step to log
            return
        if self.trainer.state.stage == "train":
            self.log("step", float(self.global_step), batch_size=1)
            # Lightning adds the epoch only on its own axis
            self.log("epoch", float(self.current_epoch), batch_size=1)
        else:  # validation: an epoch value, the same on every rank
            self.log("step", float(self.global_step), batch_size=1, sync_dist=True)

    def micro_batches(self, rows: Tensor) -> list[Tensor]:
        return list(rows.split(self.hparams.micro_batch_size))

    @property
    def trims_padding(self) -> bool:
        """Trim micro-batches (not under routing replay, whose route views keep the rollout's width)."""
        return self.hparams.get("trim_padding", True) and not self._forward_contexts

    def micro_lengths(self, rollout: Rollout) -> Tensor | None:
        """Response lengths ``[N]`` to group micro-batches by, or None to keep the given order."""
        return rollout.response_mask.sum(-1) if self.trims_padding else None

    def micro_batch(self, rollout: Rollout, rows: Tensor) -> Rollout:
        """Rows ``rows`` of ``rollout``, without trailing all-padding columns when trimming."""
        micro = rollout.select(rows)
        return trim_padding(micro) if self.trims_padding else micro

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

    @property
    def tracks_router_shift(self) -> bool:
        return self.algorithm.router_shift or self.hparams.track_router_shift

    def router_capture(self, micro: Rollout) -> contextlib.AbstractContextManager:
        """Capture router log-probs at the positions predicting response tokens (RSPO), or nothing."""
        if not self.tracks_router_shift:
            return contextlib.nullcontext()
        return capture_router_logits(self.policy, positions=slice(micro.prompt_len - 1, -1))

    # The steps of an update, each in its own file; methods so that tests and callbacks can wrap them.
    def compute_old_logprobs(self, rollout: Rollout) -> dict[str, float]:
        return old_pass.compute_old_logprobs(self, rollout)

    def policy_update(self, rollout: Rollout) -> dict[str, float]:
        return update.policy_update(self, rollout)

    def mini_batch_step(self, rollout: Rollout, rows: Tensor) -> dict[str, float]:
        return update.mini_batch_step(self, rollout, rows)

    def micro_batch_loss(
        self, micro: Rollout, capture: Any, **norms: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return update.micro_batch_loss(self, micro, capture, **norms)

    def router_shift_weight(self, micro: Rollout, capture: Any) -> tuple[Tensor | None, dict[str, Tensor]]:
        return router_shift_weight(self.algorithm, micro, capture)

    def initial_policy(self) -> torch.nn.Module:
        """The policy as :meth:`configure_model` first built it (same source, same seed), without LoRA,
        on this module's device, and sharded like the policy under FSDP2."""
        hp = self.hparams
        mesh = data_parallel_mesh(self)
        rank0 = loads_on_rank0(hp, mesh)  # one host copy per node, as configure_model
        policy, _ = (load_on_rank0 if rank0 else load_policy)(
            hp.pretrained, hp.config, dtype=hp.dtype, tokenizer=hp.tokenizer, seed=self.init_seed
        )
        policy.config.use_cache = False
        state = full_state(policy) if rank0 else None
        if not rank0:
            policy.to(self.device)
        if mesh is None:
            return policy
        shard_policy(policy, mesh, mp_policy=mixed_precision_policy(hp.compute_dtype))
        if rank0:
            receive_shards(policy, state)
            policy.to(self.device)
        return policy

    @property
    def saves_adapters_only(self) -> bool:
        """LoRA on a model loaded from ``model.pretrained``: the frozen base weights are not saved (the
        checkpoint holds the adapters, a ``full`` router and the optimizer); a resume reloads the base."""
        return bool(self.hparams.lora) and self.hparams.pretrained is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["init_seed"] = self.init_seed
        checkpoint["run_identity"] = ckpt_match.record(self)  # what a resume must match
        if self.saves_adapters_only and "state_dict" in checkpoint:
            trained = {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitting = self._trainer is None or self.trainer.state.fn == "fit"
        ckpt_match.check_resume(self, checkpoint, self._trainer and self.trainer.ckpt_path, fitting=fitting)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.init_seed = checkpoint.get("init_seed", self.init_seed)

    # ------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rewards = batch.get("val_rewards")
        if rewards is None:
            raise RuntimeError("batch has no 'val_rewards': add lit_moe_rl.callbacks.RolloutCallback")
        # on the module's device: sync_dist all-reduces it, and NCCL cannot reduce a CPU tensor
        mean = rewards.float().mean().to(self.device)
        self.log("val/reward", mean, batch_size=len(rewards), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------ export
    def gather_for_export(self) -> None:
        """Every rank, before rank 0's :meth:`save_hf`: all-gather the full weights to rank 0's host memory
        when no resident copy holds them (a collective; a no-op otherwise)."""
        self._export_state = gather_full_state(self)

    def save_hf(self, path: str) -> None:
        """Save the policy (LoRA merged) and tokenizer as a Hugging Face folder ``from_pretrained`` loads.

        A sharded policy is saved from its full rollout copy (refreshed after every optimizer step), or
        under ``rollout_weights: unshard`` from the full state gathered by :meth:`gather_for_export`."""
        model = self.rollout_policy()
        if self._export_state is not None:
            model, self._export_state = export_model(self, self._export_state), None
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
