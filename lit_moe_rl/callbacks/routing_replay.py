"""RoutingReplayCallback: R3 (rollout routing replay) and R2 (vanilla routing replay) for the trainer.

R3 (Ma et al., arXiv 2510.11370 §4.1; docs/algorithms.md §3.1): the rollout engine records the top-K
experts of every token it feeds forward (prompt and response); every training forward of that
sequence, the π_old pass and every update, uses those experts, with gates from the live training
router. R2 (Qwen, arXiv 2512.01374; docs/algorithms.md §3.5): the π_old pass routes natively and
records its experts; the updates replay them. This callback is the orchestration only; the work is
done by :mod:`lit_moe_rl.routing` (record, replay, checks, the compact :class:`RouteStore`).

How it plugs in:

* ``setup`` finds the :class:`~lit_moe_rl.callbacks.rollout.RolloutCallback`; ``on_fit_start``
  (after ``configure_model`` built the policy, before the sanity check and any step) checks the
  policy is an MoE model, turns on route recording in the rollout engine and registers a forward
  context with :meth:`lit_moe_rl.module.MoERLModule.add_forward_context`. The module enters it
  around every policy forward (and backward) with the phase and the micro-batch:

  ====================  =================================  ==========================================
  phase                 R3                                 R2
  ====================  =================================  ==========================================
  ``old`` (no grad)     replay the rollout routes          route natively, record (the θ_old routes)
  ``update``            replay the rollout routes          replay the θ_old routes of these rows
  ``ref``               native (replay if                  native (replay θ_old routes if
                        ``replay_reference``)              ``replay_reference``)
  ``fused``             replay the rollout routes          (never: R2 keeps the separate π_old pass)
  ====================  =================================  ==========================================

  ``fused`` is the one update forward of a step with one mini-batch, from which the learner also reads
  π_old (:attr:`Learner.fuses_old_pass <lit_moe_rl.learner.Learner.fuses_old_pass>`): under R3 the π_old
  pass and the update replay the same routes with gates from the same router at the same weights, so the
  separate pass would compute exactly the update forward's log-probs again. The callback does there
  what it does in both ``old`` and ``update`` (checks, fallbacks, every agreement metric). Micro-batches
  trimmed of their padding columns (``model.trim_padding``) carry their routes trimmed the same way.

  Validation and generation never replay: they never enter the module's forward context.
* The rollout routes are a :class:`~lit_moe_rl.routing.store.RouteStore` on CPU (prompt routes once
  per GRPO group, pinned when CUDA is present); each micro-batch materialises its own rows only and
  moves them to the device. R2's θ_old routes are collected per micro-batch, keyed by the row ids
  :meth:`Rollout.select <lit_moe_rl.batch.Rollout.select>` puts on every micro-batch, packed into a
  store at the first update and dropped at the end of the step.

Logged every step (``routing/``):

* ``route_bytes``: bytes of one token's routes, ``L · K · itemsize``; ``store_bytes`` and
  ``store_saved_frac`` (versus a dense ``[N, P + R, L, K]`` tensor).
* ``fallback_tokens``: positions forwarded that routed natively because their route is -1 (padding,
  the last sampled token), once per row (a micro-batch trimmed of its padding columns forwards none
  past its longest response; under R2 a column an update forwards past the width its π_old
  micro-batch kept has no θ_old route); ``fallback_real_tokens``: those among them that are real tokens whose
  output the loss uses (the last position predicts nothing, so it is left out): 0 unless the engine
  failed to return routes for some tokens.
* ``rollout_train_*`` (old pass, whenever routes are recorded): the rollout routes against the
  experts the training forward actually used. With R3 this is 0 by construction, and measured: it
  is the check that replay happened. With ``mode: off`` it is the paper's routing discrepancy
  (§3.2), the mismatch R3 removes.
* ``replay_native_*`` (R3, old pass): the replayed routes against the router's own top-K at the
  same positions under replay (:attr:`RouteReplayer.native_routes`, no extra forward). Layers after
  the first see replayed hidden states, so this is a little lower than ``mode: off``'s figure.
* ``update_replay_native_router_disagreement`` (R3/R2, update passes): the same during the updates,
  where it also includes the drift of the router since θ_old.

Each agreement family logs ``router_disagreement``, ``token_disagreement``,
``routers_differing_per_token``, ``overlap_at_k`` and ``overlap_at_k/<layer>``
(:func:`lit_moe_rl.metrics.routing_agreement`), over real tokens with a route on both sides.

Deviations: R2's routes come from the module's π_old pass (as verl's R2), so with ``mini_batches: 1``
R2 replays what the first update would have chosen anyway and changes nothing but the cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_moe_rl.batch import Rollout
from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.metrics import routing_agreement
from lit_moe_rl.routing.adapters import find_moe_routers, moe_layout
from lit_moe_rl.routing.checks import require_moe, validate_routes
from lit_moe_rl.routing.record import record_routes
from lit_moe_rl.routing.replay import RouteReplayer, replay_routes
from lit_moe_rl.routing.store import RouteStore, as_route_tensor

if TYPE_CHECKING:
    from lit_moe_rl.learner import Learner

Mode = Literal["off", "R3", "R2"]
MODES = ("off", "R3", "R2")


class _Agreement:
    """Token-weighted running sums of :func:`routing_agreement` over micro-batches (kept on device)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.tokens: Tensor | float = 0.0

    def add(self, routes_a: Tensor, routes_b: Tensor, valid: Tensor) -> None:
        stats = routing_agreement(routes_a, routes_b.to(routes_a.device), valid.to(routes_a.device))
        tokens = stats.pop("tokens")
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * tokens
        self.tokens = self.tokens + tokens

    def result(self, prefix: str, keys: tuple[str, ...] | None = None) -> dict[str, float]:
        if not self.sums:
            return {}
        tokens = max(float(self.tokens), 1.0)
        return {
            f"routing/{prefix}_{key}": float(value) / tokens
            for key, value in self.sums.items()
            if keys is None or key in keys
        }


class _StepState:
    """What one training step accumulates; dropped at the end of the step."""

    def __init__(self) -> None:
        self.rollout_train = _Agreement()
        self.replay_native = _Agreement()
        self.update_native = _Agreement()
        self.fallback = 0
        self.fallback_real = 0
        self.route_bytes = 0  # L * K * itemsize of the routes seen this step
        self.store: RouteStore | None = None
        self.old_parts: list[tuple[Tensor, Tensor]] = []  # R2: (rows, routes) per old micro-batch
        self.old_store: RouteStore | None = None
        self.ran = False


class RoutingReplayCallback(Callback):
    """R3 / R2 routing replay in the module's π_old and update forwards, with routing diagnostics."""

    def __init__(
        self, mode: Mode = "R3", replay_reference: bool = False, log_native_agreement: bool = True
    ) -> None:
        """
        Args:
            mode: ``R3`` replays the rollout engine's routes in the π_old pass and every update;
                ``R2`` replays the π_old pass's own routes in the updates; ``off`` replays nothing.
            replay_reference: Also replay in the reference model's forward (phase ``ref``). Off by
                default: the reference routes natively (slime's choice, docs/algorithms.md §3.1).
            log_native_agreement: Record the rollout engine's routes (even when ``mode`` does not
                replay them) and log their agreement with the training forward's routing
                (``routing/rollout_train_*``, ``routing/replay_native_*``). With ``mode: off`` this
                is how to see the train/inference routing mismatch without replaying.
        """
        if mode not in MODES:
            raise ValueError(f"routing_replay.mode: must be one of {', '.join(MODES)}, got {mode!r}")
        if replay_reference and mode == "off":
            raise ValueError("routing_replay.replay_reference: needs routing_replay.mode R3 or R2, got 'off'")
        self.mode = mode
        self.replay_reference = replay_reference
        self.log_native_agreement = log_native_agreement
        self._rollout_cb: RolloutCallback | None = None
        self._learner: Learner | None = None  # the learner whose forwards this callback wraps
        self._active = False
        self._layout = (0, 0, 0)  # (MoE layers, top-K, experts) of the policy
        self._routers: dict[int, list] = {}  # id(model) -> its routers, found once
        self._state = _StepState()

    # ------------------------------------------------------------------ set-up
    @property
    def records_rollout_routes(self) -> bool:
        """Whether the rollout engine must record routes: R3 replays them, the agreement logs use them."""
        return self._active and (self.mode == "R3" or self.log_native_agreement)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, RolloutCallback)]
        if not found:
            raise ValueError(
                "routing_replay: needs lit_moe_rl.callbacks.rollout.RolloutCallback in trainer.callbacks "
                "(the lit-moe-rl CLI registers it)"
            )
        self._rollout_cb = found[0]
        if not hasattr(pl_module, "add_forward_context"):
            raise ValueError(
                f"routing_replay: the LightningModule {type(pl_module).__name__} has no learner; "
                "use lit_moe_rl.module.MoERLModule"
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``configure_model``, before the sanity check and the first step: fail on a dense model."""
        policy = pl_module.policy
        if self.mode != "off":
            require_moe(policy, f"routing_replay (mode {self.mode})")
            self._active = True
        elif self.log_native_agreement:
            self._active = bool(find_moe_routers(policy))
            if not self._active:
                rank_zero_warn(
                    "routing_replay: mode off on a dense model: no routes to record, nothing logged"
                )
        if self.records_rollout_routes:
            self._rollout_cb.record_routes = True
        self._layout = moe_layout(policy)
        self._routers = {id(policy): find_moe_routers(policy)} if self._active else {}
        if self._active and self._learner is not pl_module.learner:
            # R3 replays the same routes in the π_old pass and the update: one forward can be both
            pl_module.learner.add_forward_context(self.forward_context, fusable=self.mode == "R3")
            self._learner = pl_module.learner

    # ------------------------------------------------------------------ step bookkeeping
    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._state = _StepState()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = self.step_metrics()
        self._state = _StepState()  # free the step's routes
        if metrics:
            log = getattr(pl_module, "log_reduced", None)  # reduced across ranks
            log(metrics) if log else pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def step_metrics(self) -> dict[str, float]:
        """The ``routing/*`` scalars of the current step (empty if no forward ran through the callback)."""
        state = self._state
        if not state.ran:
            return {}
        metrics: dict[str, float] = {}
        if state.route_bytes:
            metrics["routing/route_bytes"] = float(state.route_bytes)
        store = state.store if state.store is not None else state.old_store
        if store is not None:
            metrics["routing/store_bytes"] = float(store.nbytes)
            metrics["routing/store_saved_frac"] = 1.0 - store.nbytes / max(store.dense_nbytes, 1)
        if self.mode != "off":
            metrics["routing/fallback_tokens"] = float(state.fallback)
            metrics["routing/fallback_real_tokens"] = float(state.fallback_real)
        metrics |= state.rollout_train.result("rollout_train")
        metrics |= state.replay_native.result("replay_native")
        metrics |= state.update_native.result("update_replay_native", keys=("router_disagreement",))
        return metrics

    # ------------------------------------------------------------------ the forward context
    def forward_context(self, phase: str, micro: Rollout) -> contextlib.AbstractContextManager:
        """Registered with the module: the context entered around one micro-batch's forward (+ backward)."""
        if phase == "old":
            return self._old_pass(micro)
        if phase == "fused":  # registered fusable under R3 only: the update forward is also π_old
            return self._old_pass(micro, fused=True)
        if phase == "update" and self.mode != "off":
            return self._replay_pass(
                micro, self._update_routes(micro), phase, count_fallback=self.mode == "R2"
            )
        if phase == "ref" and self.replay_reference:
            return self._replay_pass(
                micro, self._reference_routes(micro), phase, target=self._reference_model()
            )
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _old_pass(self, micro: Rollout, *, fused: bool = False) -> Iterator[None]:
        """The π_old pass (``fused``: the update forward that is also the π_old pass, R3 only)."""
        state = self._state
        state.ran = True
        routes = self._rollout_routes(micro, required=self.mode == "R3")
        model = _decoder(self._learner.policy)
        record = self.mode == "R2" or (routes is not None and self.log_native_agreement)
        replayer: RouteReplayer | None = None
        with contextlib.ExitStack() as stack:
            if self.mode == "R3":
                replayer = self._enter_replay(stack, model, routes, micro, "fused" if fused else "old")
            elif routes is not None:
                _validate(routes, self._layout, micro, "old")
            recorder = stack.enter_context(record_routes(model, micro.shared_prefix)) if record else None
            yield
        valid = micro.attention_mask.bool()
        if routes is not None:
            state.route_bytes = routes.shape[2] * routes.shape[3] * routes.element_size()
        if replayer is not None:
            self._count_fallback(replayer, routes, valid)
            if self.log_native_agreement:
                state.replay_native.add(routes, replayer.native_routes, valid)
                if fused:  # this forward is the update's too (at θ_old: the same figure)
                    state.update_native.add(routes, replayer.native_routes, valid)
        if recorder is not None:
            consumed = recorder.routes  # [n, S, L, K]: the experts the forward used (replayed under R3)
            if routes is not None and self.log_native_agreement:
                state.rollout_train.add(routes, consumed, valid)
            if self.mode == "R2":
                state.old_parts.append((_row_ids(micro), consumed.cpu()))
                state.route_bytes = consumed.shape[2] * consumed.shape[3] * consumed.element_size()

    @contextlib.contextmanager
    def _replay_pass(
        self,
        micro: Rollout,
        routes: Tensor,
        phase: str,
        *,
        target: nn.Module | None = None,
        count_fallback: bool = False,
    ) -> Iterator[None]:
        model = _decoder(target if target is not None else self._learner.policy)
        track = phase == "update" and self.log_native_agreement
        with contextlib.ExitStack() as stack:
            replayer = self._enter_replay(stack, model, routes, micro, phase, keep_native=track)
            yield
        valid = micro.attention_mask.bool()
        if count_fallback:
            self._count_fallback(replayer, routes, valid)
        if track:
            self._state.update_native.add(routes, replayer.native_routes, valid)

    def _enter_replay(
        self,
        stack: contextlib.ExitStack,
        model: nn.Module,
        routes: Tensor,
        micro: Rollout,
        phase: str,
        keep_native: bool | None = None,
    ) -> RouteReplayer:
        keep = self.log_native_agreement if keep_native is None else keep_native
        try:
            return stack.enter_context(
                replay_routes(
                    model,
                    routes,
                    input_ids=micro.input_ids,
                    keep_native=keep,
                    validate=phase != "update",  # the old pass already validated these routes
                    routers=self._routers.get(id(model)),
                    prefix=micro.shared_prefix,
                )
            )
        except ValueError as err:
            where = "update pass, also the π_old pass" if phase == "fused" else f"{phase} pass"
            raise ValueError(f"routing_replay ({self.mode}, {where}): {err}") from None

    def _count_fallback(self, replayer: RouteReplayer, routes: Tensor, valid: Tensor) -> None:
        self._state.fallback += replayer.fallback_tokens
        missing = (routes[..., 0] < 0).any(-1)  # [n, S]
        missing[:, -1] = False  # the last position's output is never used
        self._state.fallback_real += int((missing & valid.to(missing.device)).sum())

    # ------------------------------------------------------------------ where the routes come from
    def _rollout_routes(self, micro: Rollout, *, required: bool) -> Tensor | None:
        """The micro-batch's rollout routes ``[n, P + R, L, K]`` on the policy's device, or None."""
        if micro.routes is None:
            if required:
                raise RuntimeError(
                    "routing_replay: Rollout.routes is missing: the rollout engine recorded no routes "
                    "(RolloutCallback.record_routes is off, or its engine cannot record them)"
                )
            return None
        if isinstance(micro.routes, RouteStore) and self._state.store is None:
            self._state.store = micro.routes
        return _to_device(as_route_tensor(micro.routes), micro.input_ids.device)

    def _update_routes(self, micro: Rollout) -> Tensor:
        if self.mode == "R3":
            return self._rollout_routes(micro, required=True)
        return _to_device(self._old_routes(micro), micro.input_ids.device)

    def _reference_routes(self, micro: Rollout) -> Tensor:
        if self.mode == "R3":
            return self._rollout_routes(micro, required=True)
        parts = self._state.old_parts
        rows = _row_ids(micro)
        for part_rows, routes in parts:  # the ref pass runs right after the old pass of the same rows
            if torch.equal(part_rows, rows):
                return _to_device(routes, micro.input_ids.device)
        raise RuntimeError(
            "routing_replay (R2, ref pass): no θ_old routes for these rows yet; the reference forward "
            "must follow the π_old forward of the same micro-batch"
        )

    def _old_routes(self, micro: Rollout) -> Tensor:
        """R2: the θ_old routes of the micro-batch's rows, from the packed store of this step's old pass."""
        state = self._state
        if state.old_store is None:
            if not state.old_parts:
                raise RuntimeError(
                    "routing_replay (R2): no θ_old routes recorded this step; the module's π_old pass "
                    "must run through the forward context before the updates"
                )
            state.old_store = _pack_old_routes(state.old_parts, micro)
            state.old_parts = []
        rows = _row_ids(micro)
        if int(rows.max()) >= state.old_store.num_rows:
            raise RuntimeError(f"routing_replay (R2): row {int(rows.max())} has no θ_old routes")
        return _fit_positions(state.old_store.rows(rows), micro.input_ids.shape[1])

    def _reference_model(self) -> nn.Module | None:
        reference = self._learner.reference
        return getattr(reference, "model", None)  # None: the reference is the policy (LoRA adapter off)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack the module's log-prob pass calls (its forward pre-hook then sees each forward)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) else model


def _row_ids(micro: Rollout) -> Tensor:
    if micro.rows is None:
        raise RuntimeError("routing_replay (R2): the micro-batch has no row ids (Rollout.select sets them)")
    return micro.rows.detach().long().cpu()


def _to_device(routes: Tensor, device: torch.device) -> Tensor:
    if routes.device == device:
        return routes
    if device.type == "cuda":
        return routes.pin_memory().to(device, non_blocking=True)
    return routes.to(device)


def _validate(routes: Tensor, layout: tuple[int, int, int], micro: Rollout, phase: str) -> None:
    layers, top_k, num_experts = layout
    try:
        validate_routes(
            routes, num_layers=layers, top_k=top_k, num_experts=num_experts, seq_shape=micro.input_ids.shape
        )
    except ValueError as err:
        raise ValueError(f"routing_replay (off, {phase} pass): {err}") from None


def _fit_positions(routes: Tensor, positions: int) -> Tensor:
    """``routes [n, S, L, K]`` cut or right-padded with -1 (native routing) to ``positions`` columns.

    R2 under ``model.trim_padding``: each π_old micro-batch recorded only the columns it kept; a column
    past them is right padding for that row (attended by no real token), so it has no θ_old route."""
    if routes.shape[1] >= positions:
        return routes[:, :positions]
    pad = routes.new_full((routes.shape[0], positions - routes.shape[1], *routes.shape[2:]), -1)
    return torch.cat([routes, pad], dim=1)


def _pack_old_routes(parts: list[tuple[Tensor, Tensor]], micro: Rollout) -> RouteStore:
    """R2: the old pass's per-micro-batch routes, put back in row order and packed per GRPO group
    (micro-batches trimmed to different widths padded to the widest with -1)."""
    rows = torch.cat([r for r, _ in parts])
    width = max(t.shape[1] for _, t in parts)
    routes = torch.cat([_fit_positions(t, width) for _, t in parts])
    if not torch.equal(rows.sort().values, torch.arange(len(rows))):
        raise RuntimeError("routing_replay (R2): the π_old pass did not cover every row of the rollout once")
    full = torch.empty_like(routes)
    full[rows] = routes
    return RouteStore.pack(full, micro.prompt_len, micro.group_size)
