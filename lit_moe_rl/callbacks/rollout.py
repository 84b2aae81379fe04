"""RolloutCallback: sample, score and package a :class:`~lit_moe_rl.batch.Rollout` for every step.

A thin adapter over :mod:`lit_moe_rl.rollout.engine` (sampling), :mod:`lit_moe_rl.rewards` (scoring)
and the module's algorithm (advantages, dynamic sampling). Registered by the CLI, so every
``lit-moe-rl fit`` has one; configure it under the top-level ``rollout:`` key.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_moe_rl.batch import Rollout
from lit_moe_rl.distributed import is_distributed
from lit_moe_rl.parallel.unshard import check_engine
from lit_moe_rl.rewards import RewardFn, resolve_reward
from lit_moe_rl.rewards.failures import FailureTracker
from lit_moe_rl.rewards.workers import Isolation, RewardScorer
from lit_moe_rl.rollout.engine import Generation, HFEngine, RolloutEngine
from lit_moe_rl.rollout.per_prompt import generate_per_prompt
from lit_moe_rl.rollout.prompts import Prompt, prompt_text
from lit_moe_rl.routing.store import pack_routes


class RolloutCallback(Callback):
    """Generates ``group_size`` completions per prompt before each training step and scores them."""

    def __init__(
        self,
        engine: RolloutEngine | None = None,
        reward: RewardFn | str = "lit_moe_rl.rewards.countdown:CountdownReward",
        group_size: int = 8,
        reward_timeout_s: float = 10.0,
        reward_isolation: Isolation = "auto",
        reward_workers: int = 2,
        stop_after_failed_batches: int = 1,
        val_samples: int = 1,
        seed: int = 0,
        seed_per_prompt: bool = False,
    ) -> None:
        """
        Args:
            engine: Rollout engine (``class_path``); default ``HFEngine()``.
            reward: Reward function: an instance or an import path ``pkg.mod:fn``.
            group_size: G, completions per prompt.
            reward_timeout_s: Per-batch reward deadline in seconds (> 0); late or failing samples score 0.
            reward_isolation: ``process``: score in worker processes killed at the deadline; ``thread``:
                in daemon threads (cheaper; a stuck call keeps a CPU busy); ``auto``: threads only for a
                reward with ``thread_safe = True`` (the built-in Countdown reward).
            reward_workers: Worker processes (or threads) scoring in parallel (>= 1).
            stop_after_failed_batches: Stop the run when every reward call of this many batches in a
                row (training steps or validation batches) failed: the reward is broken or needs fields
                the data lacks, and training on all-zero rewards learns nothing (>= 0; 0 = never stop).
            val_samples: k for validation Avg@k; 1 = one greedy completion per prompt.
            seed: Sampling seed; each step samples with ``seed + global_step`` (rank ``r`` adds
                ``r * 100003``), so a resumed run samples what an uninterrupted one would.
            seed_per_prompt: Sample each prompt alone under a seed of (seed, step, prompt text): its
                completions then do not depend on the rank or batch it lands in (W ranks sample what
                one process with W times the batch does), at one engine call per prompt.
        """
        if group_size < 2:
            raise ValueError(
                f"rollout.group_size: group-relative advantages need >= 2 completions per prompt, got {group_size}"
            )
        if val_samples < 1:
            raise ValueError(f"rollout.val_samples: must be >= 1, got {val_samples}")
        if not reward_timeout_s > 0:
            raise ValueError(f"rollout.reward_timeout_s: must be > 0, got {reward_timeout_s}")
        if stop_after_failed_batches < 0:
            raise ValueError(
                f"rollout.stop_after_failed_batches: must be >= 0, got {stop_after_failed_batches}"
            )
        self.engine = engine if engine is not None else HFEngine()
        self.reward = resolve_reward(reward)
        self.scorer = RewardScorer(self.reward, reward_isolation, reward_workers)
        self.failures = FailureTracker(stop_after_failed_batches)
        self.group_size = group_size
        self.reward_timeout_s = reward_timeout_s
        self.val_samples = val_samples
        self.seed = seed
        self.seed_per_prompt = seed_per_prompt
        self.record_routes = False  # switched on by RoutingReplayCallback (R3)

    def _bind(self, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "hparams", {}).get("rollout_weights") == "unshard":
            check_engine(self.engine)
        self.engine.bind(_rollout_policy(pl_module), pl_module.tokenizer)

    def _sync(self, pl_module: L.LightningModule) -> None:
        self.engine.sync_weights(_rollout_policy(pl_module, sync=True))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bind(pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self.engine, "model", None) is None:
            self._bind(pl_module)
        self._sync(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)  # after a checkpoint restore

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batch["rollout"] = self.make_rollout(
            pl_module, batch["prompt"], batch["samples"], step=trainer.global_step
        )

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        greedy = self.val_samples == 1
        with torch.random.fork_rng(devices=_devices(pl_module)), _generation_weights(pl_module):
            torch.manual_seed(self.seed + 7919 * (batch_idx + 1))
            gen = self.engine.generate(batch["prompt"], n=self.val_samples, greedy=greedy)
        texts = self.decode(gen)
        rewards, _ = self._score(texts, batch["samples"], self.val_samples)
        batch["val_rewards"] = rewards.view(-1, self.val_samples).mean(-1)  # Avg@k per prompt
        batch["val_texts"] = texts

    def make_rollout(
        self, pl_module: Any, prompts: list[Prompt], samples: list[dict], *, step: int
    ) -> Rollout:
        """Generate, score and compute advantages for one step's prompts."""
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=_devices(pl_module)), _generation_weights(pl_module):
            if self.seed_per_prompt:
                gen = generate_per_prompt(
                    self.engine,
                    prompts,
                    n=self.group_size,
                    seed=self.seed,
                    step=step,
                    record_routes=self.record_routes,
                )
            else:
                torch.manual_seed(self.seed + step + 100_003 * getattr(pl_module, "global_rank", 0))
                gen = self.engine.generate(prompts, n=self.group_size, record_routes=self.record_routes)
        texts = self.decode(gen)
        rewards, errors = self._score(texts, samples, self.group_size)
        algorithm = pl_module.algorithm
        rollout = Rollout(
            input_ids=gen.input_ids,
            attention_mask=gen.attention_mask,
            response_mask=gen.response_mask,
            prompt_len=gen.prompt_len,
            group_size=self.group_size,
            temperature=getattr(self.engine, "temperature", 1.0),
            max_response_len=getattr(self.engine, "max_new_tokens", None),
            rewards=rewards,
            advantages=algorithm.advantages(rewards, self.group_size),
            infer_logp=gen.infer_logp,
            routes=pack_routes(gen.routes, gen.prompt_len, self.group_size),
            texts=texts,
            prompts=[prompt_text(prompt) for prompt in prompts for _ in range(self.group_size)],
        )
        rollout.extras = rollout_metrics(gen, rewards, errors)
        keep = algorithm.keep_groups(rewards, self.group_size)
        if keep is not None:
            rollout.extras["rollout/kept_frac"] = float(keep.float().mean())
            rollout = keep_rows(rollout, keep)
        rollout.extras["perf/rollout_s"] = time.perf_counter() - t0
        return rollout

    def decode(self, gen: Generation) -> list[str]:
        tokens = gen.input_ids[:, gen.prompt_len :].masked_fill(
            ~gen.response_mask, self.engine.tokenizer.pad_token_id
        )
        return self.engine.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)

    def _score(self, texts: list[str], samples: list[dict], n: int) -> tuple[torch.Tensor, int]:
        expanded = [sample for sample in samples for _ in range(n)]
        rewards, failures = self.scorer.score(texts, expanded, timeout_s=self.reward_timeout_s)
        self.failures.update(failures, len(texts))
        return rewards, len(failures)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.scorer.close()


def rollout_metrics(gen: Generation, rewards: torch.Tensor, errors: int) -> dict[str, float]:
    """``reward/*`` and ``rollout/*`` scalars of one generation."""
    lengths = gen.response_mask.sum(-1).float()
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/errors": float(errors),
        "rollout/response_length": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_frac": float(gen.truncated.float().mean()),
    }


def keep_rows(rollout: Rollout, keep: torch.Tensor) -> Rollout:
    """The kept rows of ``rollout``; when none is kept and other ranks train, the first group stays as a
    zero-weight placeholder (:attr:`Rollout.placeholder`) so that this rank joins their collectives."""
    if keep.any() or not is_distributed():
        return rollout.select(keep.nonzero().squeeze(-1))
    placeholder = rollout.select(torch.arange(rollout.group_size))
    placeholder.placeholder = True
    return placeholder


def _rollout_policy(pl_module: Any, *, sync: bool = False) -> Any:
    """What the engine generates with: the policy, or (FSDP) its full copy, refreshed when ``sync``."""
    if sync and hasattr(pl_module, "sync_rollout_policy"):
        return pl_module.sync_rollout_policy()
    return pl_module.rollout_policy() if hasattr(pl_module, "rollout_policy") else pl_module.policy


def _generation_weights(pl_module: Any) -> Any:
    """The module's context around generation (FSDP2 unshard, optimizer offload), or nothing."""
    enter = getattr(pl_module, "generation_weights", None)
    return enter() if enter is not None else contextlib.nullcontext()


def _devices(pl_module: Any) -> list[int]:
    device = pl_module.device
    return [device.index or 0] if device.type == "cuda" else []
