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
from lit_moe_rl.callbacks.multiturn import (
    MultiTurnSettings,
    ValMultiturn,
    marked_transcripts,
    multiturn_metrics,
)
from lit_moe_rl.learner.stats import Gathered
from lit_moe_rl.parallel.distributed import is_distributed
from lit_moe_rl.parallel.unshard import check_engine
from lit_moe_rl.rewards import RewardFn, resolve_reward
from lit_moe_rl.rewards.failures import FailureTracker
from lit_moe_rl.rewards.workers import Isolation, RewardScorer
from lit_moe_rl.rollout.engine import Generation, HFEngine, RolloutEngine, generate_trajectories
from lit_moe_rl.rollout.multiturn import check_window
from lit_moe_rl.rollout.per_prompt import generate_per_prompt
from lit_moe_rl.rollout.prompts import Prompt, prompt_text
from lit_moe_rl.routing.store import pack_routes

DEFAULT_REWARD = "lit_moe_rl.rewards.countdown:CountdownReward"


class RolloutCallback(Callback):
    """Generates ``group_size`` completions per prompt before each training step and scores them."""

    def __init__(
        self,
        engine: RolloutEngine | None = None,
        reward: RewardFn | str | None = None,
        group_size: int = 8,
        reward_timeout_s: float = 10.0,
        reward_isolation: Isolation = "auto",
        reward_workers: int = 2,
        stop_after_failed_batches: int = 1,
        val_samples: int = 1,
        seed: int = 0,
        seed_per_prompt: bool = False,
        env: dict[str, Any] | None = None,
        max_turns: int = 3,
        max_total_tokens: int | None = None,
        max_env_tokens: int = 256,
        env_timeout_s: float = 10.0,
        env_isolation: Isolation = "auto",
        env_workers: int = 2,
        max_batch_tokens: int | None = None,
    ) -> None:
        """
        Args:
            engine: Rollout engine (``class_path``); default ``HFEngine()``.
            reward: Reward function: an instance or an import path ``pkg.mod:fn``; default the Countdown
                reward, or with ``env`` the sum of the environment's step rewards (a reward set with
                ``env`` scores each whole transcript instead).
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
            env: Multi-turn rollouts: an environment ``{class_path, init_args}``
                (:class:`~lit_moe_rl.rollout.env.Environment`), one instance per trajectory.
            max_turns: With ``env``: most sampled turns per trajectory (>= 1).
            max_total_tokens: With ``env``: the trajectory's token budget after the prompt, sampled and
                observation tokens together (Dr. GRPO's constant); default ``max_turns`` times the
                engine's ``max_new_tokens`` (which caps each turn).
            max_env_tokens: With ``env``: longest observation in tokens (>= 1); longer ones are cut, counted.
            env_timeout_s: With ``env``: deadline of one environment step (> 0); a late step ends its
                trajectory, scored and counted.
            env_isolation: With ``env``: ``process``: environments live in ``env_workers`` worker processes
                killed at the deadline (a hung or crashing one cannot stop the run); ``thread``: in the
                trainer's process, each step in a thread (a hung one is abandoned); ``auto``: threads for
                an environment class with ``thread_safe = True`` (the built-in Countdown one).
            env_workers: With ``env_isolation: process``: worker processes (>= 1).
            max_batch_tokens: Token budget of the engine's live KV cache per rank (rows x cache length,
                >= 1): prompts generate in waves that fit it (:mod:`lit_moe_rl.rollout.waves`); None = one
                wave. Sets the HFEngine's ``max_batch_tokens``.
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
        if max_batch_tokens is not None:
            if max_batch_tokens < 1 or not hasattr(self.engine, "max_batch_tokens"):
                raise ValueError(
                    f"rollout.max_batch_tokens: must be >= 1 and needs the HFEngine, got {max_batch_tokens!r}"
                )
            self.engine.max_batch_tokens = max_batch_tokens
        self.multiturn = (
            None
            if env is None
            else MultiTurnSettings.make(
                env,
                self.engine,
                max_turns,
                max_total_tokens,
                max_env_tokens,
                env_timeout_s,
                env_isolation,
                env_workers,
            )
        )
        if self.multiturn is not None and seed_per_prompt:
            raise ValueError("rollout.seed_per_prompt: not supported with rollout.env (multi-turn) yet")
        self.env_reward = env is not None and reward is None
        self.val_multiturn = ValMultiturn()
        self.reward = resolve_reward(reward if reward is not None else DEFAULT_REWARD)
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
        self.engine.skip_padding = bool(getattr(pl_module, "hparams", {}).get("skip_padding", True))

    def _sync(self, pl_module: L.LightningModule) -> None:
        self.engine.sync_weights(_rollout_policy(pl_module, sync=True))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.multiturn is not None:
            self.multiturn.check_tokenizer(pl_module.tokenizer)
        self._bind(pl_module)
        if self.multiturn is not None:  # a sliding window the multi-turn cache could outgrow: refused now
            check_window(self.engine.model.config, self.multiturn.limits)

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
            gen = self._generate(batch["prompt"], batch["samples"], self.val_samples, greedy=greedy)
        texts = self.decode(gen)
        rewards, _ = self._rewards(gen, texts, batch["samples"], self.val_samples)
        batch["val_rewards"] = rewards.view(-1, self.val_samples).mean(-1)  # Avg@k per prompt
        batch["val_texts"] = texts
        if gen.trajectories is not None:
            self.val_multiturn.add(gen)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_multiturn.flush(trainer, pl_module)

    def make_rollout(
        self, pl_module: L.LightningModule, prompts: list[Prompt], samples: list[dict], *, step: int
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
                gen = self._generate(prompts, samples, self.group_size, record=self.record_routes)
        texts = self.decode(gen)
        rewards, errors = self._rewards(gen, texts, samples, self.group_size)
        algorithm = pl_module.algorithm
        rollout = Rollout(
            input_ids=gen.input_ids,
            attention_mask=gen.attention_mask,
            response_mask=gen.response_mask,
            prompt_len=gen.prompt_len,
            group_size=self.group_size,
            temperature=getattr(self.engine, "temperature", 1.0),
            max_response_len=self.max_response_len(),
            rewards=rewards,
            advantages=algorithm.advantages(rewards, self.group_size),
            infer_logp=gen.infer_logp,
            routes=pack_routes(gen.routes, gen.prompt_len, self.group_size),
            texts=texts if gen.trajectories is None else marked_transcripts(gen, self.engine.tokenizer),
            prompts=[prompt_text(prompt) for prompt in prompts for _ in range(self.group_size)],
        )
        rollout.extras = rollout_metrics(gen, rewards, errors)
        if gen.trajectories is not None:
            rollout.extras |= multiturn_metrics(gen)
        keep = algorithm.keep_groups(rewards, self.group_size)
        if keep is not None:
            rollout.extras["rollout/kept_frac"] = float(keep.float().mean())
            rollout = keep_rows(rollout, keep)
        rollout.extras["perf/rollout_s"] = time.perf_counter() - t0
        return rollout

    def max_response_len(self) -> int | None:
        """Dr. GRPO's constant: the engine's ``max_new_tokens``, or with ``env`` the trajectory budget."""
        if self.multiturn is not None:
            return self.multiturn.limits.max_total_tokens
        return getattr(self.engine, "max_new_tokens", None)

    def _generate(
        self,
        prompts: list[Prompt],
        samples: list[dict],
        n: int,
        *,
        greedy: bool = False,
        record: bool = False,
    ) -> Generation:
        if self.multiturn is None:
            return self.engine.generate(prompts, n=n, greedy=greedy, record_routes=record)
        return generate_trajectories(
            self.engine, prompts, samples, n=n, make_env=self.multiturn.make_env, limits=self.multiturn.limits,
            greedy=greedy, record_routes=record,
        )  # fmt: skip

    def _rewards(
        self, gen: Generation, texts: list[str], samples: list[dict], n: int
    ) -> tuple[torch.Tensor, int]:
        """The reward function on each text, or (``env`` without a reward) each trajectory's step rewards."""
        if self.env_reward and gen.trajectories is not None:
            rewards = torch.tensor([t.reward for t in gen.trajectories], dtype=torch.float32)
            return rewards, sum(t.env_errors + t.env_timeouts for t in gen.trajectories)
        rewards, errors = self._score(texts, samples, n)
        if gen.trajectories is not None:  # a trajectory whose reset() failed scores 0 whatever its text
            failed = torch.tensor([t.reset_failed for t in gen.trajectories], device=rewards.device)
            rewards = rewards.masked_fill(failed, 0.0)
        return rewards, errors

    def decode(self, gen: Generation) -> list[str]:
        """The response region's text (multi-turn: the whole transcript after the prompt, observations included)."""
        real = gen.attention_mask[:, gen.prompt_len :].bool()  # the response mask, plus observations
        tokens = gen.input_ids[:, gen.prompt_len :].masked_fill(~real, self.engine.tokenizer.pad_token_id)
        return self.engine.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)

    def _score(self, texts: list[str], samples: list[dict], n: int) -> tuple[torch.Tensor, int]:
        expanded = [sample for sample in samples for _ in range(n)]
        rewards, failures = self.scorer.score(texts, expanded, timeout_s=self.reward_timeout_s)
        self.failures.update(failures, len(texts))
        return rewards, len(failures)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.scorer.close()
        if self.multiturn is not None:
            self.multiturn.close()


def rollout_metrics(gen: Generation, rewards: torch.Tensor, errors: int) -> dict[str, float | Gathered]:
    """``reward/*`` and ``rollout/*`` scalars of one generation (per rank: reduced by the learner)."""
    lengths = gen.response_mask.sum(-1).float()
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": Gathered(rewards.detach().float().cpu()),  # the std of every rank's rewards
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


def _rollout_policy(pl_module: L.LightningModule, *, sync: bool = False) -> Any:
    """What the engine generates with: the policy, or (FSDP) its full copy, refreshed when ``sync``."""
    if sync and hasattr(pl_module, "sync_rollout_policy"):
        return pl_module.sync_rollout_policy()
    return pl_module.rollout_policy() if hasattr(pl_module, "rollout_policy") else pl_module.policy


def _generation_weights(pl_module: L.LightningModule) -> Any:
    """The module's context around generation (FSDP2 unshard, optimizer offload), or nothing."""
    enter = getattr(pl_module, "generation_weights", None)
    return enter() if enter is not None else contextlib.nullcontext()


def _devices(pl_module: L.LightningModule) -> list[int]:
    device = pl_module.device
    return [device.index or 0] if device.type == "cuda" else []
