"""The RL step without Lightning: one rollout in, optimizer steps and reduced statistics out.

Its inputs are explicit (torchtune's split of recipe loop and pure losses; Lightning's
``ThroughputMonitor`` over fabric's ``throughput.py``): the policy, the algorithm, a
:class:`~lit_moe_rl.learner.settings.LearnerSettings`, the optimizer and scheduler, a ``backward(loss)``
callable (Lightning's ``manual_backward``, or ``Tensor.backward``), the forward contexts callbacks
register (routing replay) and a :class:`~lit_moe_rl.parallel.distributed.Collectives`. A plain PyTorch loop
drives it as the LightningModule does (tests/test_learner.py):

1. old log-probs once, without grad, in micro-batches (the PPO anchor π_old; :mod:`.old_pass`);
2. ``mini_batches`` optimizer updates over shuffled slices of the rollout, each accumulating
   micro-batch gradients scaled by the mini-batch's *global* token (or sequence) count, then
   gradient clipping and a step; a non-finite loss or gradient norm skips the step (:mod:`.update`);
3. every statistic reduced by its kind across micro-batches, mini-batches and ranks (:mod:`.stats`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from lit_moe_rl.algorithms import Algorithm
from lit_moe_rl.batch import Rollout
from lit_moe_rl.compile import compiled_policy
from lit_moe_rl.experts import KERNEL, current_implementation
from lit_moe_rl.learner import old_pass, update
from lit_moe_rl.learner.batching import micro_plan, response_widths, trim_padding
from lit_moe_rl.learner.prefix import SharedPrefix
from lit_moe_rl.learner.settings import LearnerSettings
from lit_moe_rl.learner.stats import Stats, add_named
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.policy import load_balancing_loss, token_logprobs
from lit_moe_rl.routing.record import RouterLogitsCapture, capture_router_logits
from lit_moe_rl.routing.replay import checkpointing_active

Phase = Literal["old", "update", "ref", "fused"]
"""Which forward a context wraps: the π_old pass, an update, the reference, or ``fused``: the single update
forward of a one-mini-batch step that is also the π_old pass (:attr:`Learner.fuses_old_pass`)."""
ForwardContext = Callable[[Phase, Rollout], contextlib.AbstractContextManager]


class Optimizer(Protocol):
    """What the learner uses of an optimizer (torch's, or Lightning's wrapped one)."""

    param_groups: list[dict[str, Any]]

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


class Scheduler(Protocol):
    """A learning-rate scheduler, stepped once per optimizer step."""

    def step(self) -> Any: ...


class Reference(Protocol):
    """π_ref for the KL term and ``ref/kl`` (:class:`~lit_moe_rl.callbacks.ReferenceKLCallback`)."""

    def reference_logprobs(self, learner: Learner, micro: Rollout) -> Tensor: ...


class Learner:
    """Owns one RL step: π_old pass, mini-/micro-batch updates, the skip decision and the statistics."""

    def __init__(
        self,
        policy: torch.nn.Module,
        algorithm: Algorithm,
        settings: LearnerSettings,
        optimizer: Optimizer | None = None,
        scheduler: Scheduler | None = None,
        *,
        backward: Callable[[Tensor], None] | None = None,
        collectives: Collectives | None = None,
        forward_contexts: list[ForwardContext] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """``optimizer``/``scheduler``: torch's, or Lightning's wrapped ones (set later by :meth:`bind` when
        the framework builds them after the policy); ``no_sync``: DDP's gradient-sync blocker, entered for
        every micro-batch but a mini-batch's last; ``forward_contexts``: a list the caller may extend."""
        self.policy = policy
        self.algorithm = algorithm
        self.settings = settings
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.backward = backward if backward is not None else Tensor.backward
        self.collectives = collectives if collectives is not None else Collectives()
        self.forward_contexts = forward_contexts if forward_contexts is not None else []
        self.no_sync = no_sync
        self.reference: Reference | None = None
        self.aux_loss = load_balancing_loss(policy) if settings.router_aux_loss_coef > 0 else None
        self.compiled = compiled_policy(policy, settings.torch_compile)  # model.torch_compile (compile.py)
        self.skipped_steps = 0
        self.skip_noted = False  # a skipped update is said once per run
        self.optimizer_step = 0  # optimizer steps so far (Lightning's global_step): named in warnings
        self.step_tokens = 0.0  # this rank's trained response tokens in the last step (token-mean weight)
        self.fused_old: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, logp, entropy) of a fused pass
        self.fusable_contexts: list[ForwardContext] = []  # registered with fusable=True: they take "fused"

    def bind(
        self,
        optimizer: Optimizer,
        scheduler: Scheduler,
        *,
        backward: Callable[[Tensor], None],
        collectives: Collectives,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """Set what a framework provides once it has set up (Lightning: at ``on_fit_start``)."""
        self.optimizer, self.scheduler, self.backward = optimizer, scheduler, backward
        self.collectives, self.no_sync = collectives, no_sync

    @property
    def device(self) -> torch.device:
        return self.collectives.device

    # ------------------------------------------------------------------ forwards
    def add_forward_context(self, factory: ForwardContext, *, fusable: bool = False) -> None:
        """Register ``factory(phase, micro_rollout)``, entered around every policy forward (and its backward).

        ``fusable``: the factory also takes phase ``fused`` (one forward that is both the π_old pass and
        the update) and does there what it does in ``old`` and ``update``, so the learner may still read
        π_old off the update forward (:attr:`fuses_old_pass`). Without it, a registered context keeps the
        separate π_old pass: it may do something in ``old`` that the update forward does not."""
        self.forward_contexts.append(factory)
        if fusable:
            self.fusable_contexts.append(factory)

    @contextlib.contextmanager
    def forward_context(self, phase: Phase, micro: Rollout) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for factory in self.forward_contexts:
                stack.enter_context(factory(phase, micro))
            if self.compiled is not None and phase != "ref":  # the policy's compiled submodules
                stack.enter_context(self.compiled.active())
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
            chunk_size=self.settings.logprob_chunk_size,
            with_entropy=with_entropy,
            prefix=micro.shared_prefix,
            skip_padding=self.skips_padding,
            **extra,
        )

    @property
    def tracks_router_shift(self) -> bool:
        return self.algorithm.router_shift or self.settings.track_router_shift

    def router_capture(self, micro: Rollout) -> contextlib.AbstractContextManager:
        """Capture router log-probs at the positions predicting response tokens (RSPO), or nothing."""
        if not self.tracks_router_shift:
            return contextlib.nullcontext()
        return capture_router_logits(
            self.policy, positions=slice(micro.prompt_len - 1, -1), prefix=micro.shared_prefix
        )

    @property
    def fuses_old_pass(self) -> bool:
        """True when π_old can be read off the (single) update forward instead of a separate pass.

        Exact (the same function of the same weights on the same tokens) only with one mini-batch (later
        mini-batches run after an optimizer step), no reference or correction that needs π_old before the
        update, no RSPO capture of the old routers, and forward contexts that all declared themselves
        ``fusable``. Routing replay R3 does
        (:class:`~lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback`): its π_old pass and its update
        replay the same rollout routes with gates from the same router, so the update forward's detached
        log-probs are the replayed π_old (arXiv 2510.11370 §4.1). R2 does not: its updates replay routes
        that its π_old pass records.
        """
        s = self.settings
        return (
            s.old_logp_pass == "auto"
            and s.mini_batches == 1
            and all(factory in self.fusable_contexts for factory in self.forward_contexts)
            and not self.tracks_router_shift
            and self.reference is None
            and s.correction == "none"
        )

    # ------------------------------------------------------------------ micro-batches
    @property
    def trims_padding(self) -> bool:
        """Sort micro-batches by length and trim their padding columns (routes are trimmed with the tokens)."""
        return self.settings.trim_padding

    def micro_lengths(self, rollout: Rollout) -> Tensor | None:
        """Response widths ``[N]`` to group micro-batches by (:func:`~.batching.response_widths`: the
        columns a trimmed micro-batch keeps), or None to keep the given order."""
        return response_widths(rollout) if self.trims_padding else None

    @property
    def shares_prefix(self) -> bool:
        """Whether rows that share a prompt run it once (``model.shared_prefix``, :mod:`.prefix`).

        ``auto`` turns it on unless the forward cannot hold a KV cache under grad: gradient checkpointing
        (transformers drops the cache in checkpointed layers), the compiled update, or the load-balancing
        aux loss (its router logits would count each prompt once instead of once per row)."""
        return self.shared_prefix_off_reason() is None

    def shared_prefix_off_reason(self) -> str | None:
        """Why prompts are not shared (``None``: they are), as the run summary says it."""
        if self.settings.shared_prefix == "off":
            return "model.shared_prefix off"
        if checkpointing_active(self.policy):
            return "gradient checkpointing"
        if self.compiled is not None:
            return "torch_compile"
        if self.aux_loss is not None:
            return "router aux loss"
        return None

    @property
    def skips_padding(self) -> bool:
        """Whether the experts skip padding tokens (:func:`lit_moe_rl.experts.real_tokens_only`)."""
        return self.padding_skip_off_reason() is None

    def padding_skip_off_reason(self) -> str | None:
        """Why the experts compute padding tokens (``None``: they skip them), as the run summary says it.

        Only this project's experts kernel skips, and not for expert-parallel experts; gradient
        checkpointing recomputes a layer in the backward, outside the forward that says which tokens are
        padding; the compiled update would recompile for every count of real tokens."""
        if not self.settings.skip_padding:
            return "model.skip_padding false"
        if (kernel := current_implementation(self.policy)) != KERNEL:
            return f"experts {kernel or 'n/a'}"
        if checkpointing_active(self.policy):
            return "gradient checkpointing"
        if self.compiled is not None:
            return "torch_compile"
        if self.expert_parallel:
            return "expert parallel"  # the kernel hands those experts to transformers' own
        return None

    @functools.cached_property
    def expert_parallel(self) -> bool:
        """Whether any experts module is sharded by transformers' expert parallelism (set when the policy
        loads, so looked up once, not in every micro-batch's :attr:`skips_padding`)."""
        return any(getattr(m, "_is_expert_parallel", False) for m in self.policy.modules())

    def micro_batch(self, rollout: Rollout, rows: Tensor) -> Rollout:
        """Rows ``rows`` of ``rollout``, without trailing all-padding columns when trimming, with the
        layout of their shared prompts when :attr:`shares_prefix`."""
        micro = rollout.select(rows)
        micro = trim_padding(micro) if self.trims_padding else micro
        if self.shares_prefix:
            groups = None if micro.rows is None else rollout.group_of(micro.rows)
            micro.shared_prefix = SharedPrefix.find(
                micro.input_ids, micro.attention_mask, micro.prompt_len, groups=groups
            )
        return micro

    def micro_plan(self, rollout: Rollout, rows: Tensor) -> list[tuple[Tensor, bool]]:
        """``rows`` cut into micro-batches, padded to the same count on every rank; with shared prompts
        GRPO groups stay together where that runs fewer tokens (:func:`~.batching.micro_plan`)."""
        every = torch.arange(rollout.num_sequences)
        grouped = self.trims_padding and self.shares_prefix
        return micro_plan(
            rows,
            self.settings.micro_batch_size,
            self.collectives,
            fallback=every,
            lengths=self.micro_lengths(rollout),
            groups=rollout.group_of(every) if grouped else None,
            prompt_len=rollout.prompt_len,
        )

    # ------------------------------------------------------------------ the step
    def prepare(self, rollout: Rollout) -> Rollout:
        """``rollout`` on this learner's device (routes stay on the CPU), or none of its rows when no rank
        has a row to train (DAPO dropped every group): :meth:`step` then skips."""
        if self.collectives.sum(0.0 if rollout.placeholder else float(rollout.num_sequences)) == 0:
            return rollout.select(torch.arange(0))
        return rollout.to(self.device, skip=("routes", "old_routes", "old_router_logp"))

    def step(self, rollout: Rollout, *, optimizer_step: int) -> dict[str, float]:
        """One RL step on ``rollout`` (on this learner's device); returns every statistic, reduced
        across ranks. ``optimizer_step``: the optimizer steps taken so far (Lightning's ``global_step``); it
        seeds the mini-batch shuffle (the same order on resume).
        Every rank must call it. ``rollout`` receives ``old_logp`` (and RSPO's old routes)."""
        stats = Stats()
        self.optimizer_step = optimizer_step
        real = 0 if rollout.placeholder else rollout.num_sequences
        if self.collectives.sum(float(real)) == 0:  # DAPO dropped every group on every rank
            self.skip(stats)
        else:
            self.train(rollout, stats, optimizer_step)
        add_named(stats, rollout.extras, self.step_tokens)
        return stats.reduce(self.collectives)

    def train(self, rollout: Rollout, stats: Stats, optimizer_step: int) -> None:
        """π_old, then the updates, timed; statistics into ``stats``."""
        t0 = self.synced_clock()
        if self.fuses_old_pass:
            update.policy_update(self, rollout, stats, optimizer_step)
            old_pass.collect_fused_old_logprobs(self.fused_old, rollout, stats)
        else:
            old_pass.compute_old_logprobs(self, rollout, stats)
            update.policy_update(self, rollout, stats, optimizer_step)
        update_s = self.synced_clock() - t0
        self.step_tokens = 0.0 if rollout.placeholder else float(rollout.response_mask.sum())
        rollout_s = float(rollout.extras.get("perf/rollout_s", 0.0))
        stats.mean("perf/update_s", update_s, 1.0)
        stats.sum("perf/tokens_per_s", float(rollout.attention_mask.sum()) / max(update_s + rollout_s, 1e-9))

    def skip(self, stats: Stats) -> None:
        """A step with no gradient (every group dropped), still counted so that a step budget ends the run:
        ``mini_batches`` optimizer steps without gradients, as an update would take."""
        self.skipped_steps += 1
        for _ in range(self.settings.mini_batches):  # the optimizer steps an update takes: one step axis
            self.optimizer.step()
            self.optimizer_step += 1
            self.scheduler.step()
        self.step_tokens = 0.0
        stats.mean("policy/skipped_steps", float(self.skipped_steps), 1.0)

    # The parts of a step, each in its own file; methods so that tests can wrap them.
    def compute_old_logprobs(self, rollout: Rollout, stats: Stats | None = None) -> Stats:
        return old_pass.compute_old_logprobs(self, rollout, stats)

    def mini_batch_step(self, rollout: Rollout, rows: Tensor, *, updates: int = 1) -> Stats:
        return update.mini_batch_step(self, rollout, rows, updates=updates)

    def micro_batch_loss(
        self, micro: Rollout, capture: RouterLogitsCapture | None, **norms: float
    ) -> tuple[Tensor, Stats]:
        return update.micro_batch_loss(self, micro, capture, **norms)

    def synced_clock(self) -> float:
        """``time.perf_counter()`` once the device has finished its queued work (CUDA runs kernels
        asynchronously: without the sync ``perf/update_s`` would miss the optimizer step's tail)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
