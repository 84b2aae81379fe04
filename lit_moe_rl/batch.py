"""The one contract between the callbacks and the LightningModule.

Layout of a rollout of ``N = B * G`` sequences (``B`` prompts, ``G`` completions each):

- ``input_ids``: ``[N, P + R]`` — the prompt, **left**-padded to ``P``, then the response,
  **right**-padded to ``R``. Response token ``j`` sits at column ``P + j`` and is predicted by the
  logits at column ``P + j - 1``.
- every per-response-token tensor (``logp``, ``mask``, ...) is ``[N, R]``: column ``j`` is response
  token ``j``. This is the ``[B, T]`` layout the losses take.
- routes are ``[N, P + R, L_moe, K]``, aligned with ``input_ids``, ``-1`` where a position has no
  route (padding, the last sampled token).
- multi-turn (``rollout.env``): the response is prompt | turn 1 | observation 1 | turn 2 | ...;
  observation tokens have attention 1 but ``response_mask`` False (no loss, μ 0, never trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lit_moe_rl.learner.prefix import SharedPrefix
    from lit_moe_rl.routing.store import RouteStore


@dataclass
class Rollout:
    """G sampled completions per prompt, scored, with everything the update needs.

    Fields filled by the rollout callback are required; the others are filled by the module or
    by optional callbacks, which name themselves in the error when the module finds one missing.
    """

    input_ids: Tensor  # [N, P+R] long; prompt left-padded, response right-padded
    attention_mask: Tensor  # [N, P+R] long; 1 on real tokens
    response_mask: Tensor  # [N, R] bool; True on sampled tokens (up to and including EOS)
    prompt_len: int  # P
    group_size: int  # G; rows [g*G, (g+1)*G) share one prompt
    temperature: float  # the engine's sampling temperature; the trainer divides its logits by it
    rewards: Tensor  # [N] float32
    advantages: Tensor  # [N] float32 (or [N, R] for token-level estimators)
    max_response_len: int | None = None  # the engine's max_new_tokens: Dr. GRPO's constant normaliser
    infer_logp: Tensor | None = None  # [N, R] float32; the rollout engine's log-probs (mu)
    old_logp: Tensor | None = None  # [N, R] float32; training engine at theta_old (set by the module)
    ref_logp: Tensor | None = None  # [N, R] float32; reference model (ReferenceKLCallback)
    routes: Tensor | RouteStore | None = None  # [N, P+R, L_moe, K] int8/int16; rollout routes (R3), -1 = none
    # (a RouteStore, routing/store.py, holds prompt routes once per group; .rows(index) materialises rows)
    old_routes: Tensor | None = None  # [N, P+R, L_moe, K]; theta_old training routes (R2)
    old_topk: Tensor | None = (
        None  # [N, R, L_moe, K] int; experts used at the positions predicting each token
    )
    old_router_logp: Tensor | None = None  # [N, R, L_moe, K] float32; old router log-probs at old_topk (RSPO)
    token_weight: Tensor | None = (
        None  # [N, R] float, detached; off-policy correction weights (TIS, IcePop...)
    )
    log_weight: Tensor | None = None  # [N, R] float, detached; added to the log-ratio before clipping (RSPO)
    texts: list[str] = field(default_factory=list)  # N decoded completions
    prompts: list[str] = field(default_factory=list)  # N prompt strings (one per sequence)
    extras: dict[str, Any] = field(default_factory=dict)  # per-step scalars for logging
    rows: Tensor | None = None  # [n] long; set by select(): this slice's rows in the rollout it came from
    placeholder: bool = False  # True: DAPO kept no group on this rank; the rows are one dropped group,
    # carried so that the rank runs the same forwards and collectives as the others, at zero loss weight
    shared_prefix: SharedPrefix | None = None  # a micro-batch's rows that share a prompt (learner/prefix.py)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def group_of(self, rows: Tensor) -> Tensor:
        """The GRPO group of each of this rollout's rows ``rows`` (rows ``[g*G, (g+1)*G)`` are group ``g``)."""
        return rows // max(self.group_size, 1)

    def require(self, name: str, provider: str) -> Tensor:
        """Return field ``name`` or fail naming the callback that should have set it."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"Rollout.{name} is missing: add {provider} to trainer.callbacks")
        return value

    def select(self, index: Tensor) -> Rollout:
        """Rows ``index`` of every per-sequence tensor (a mini- or micro-batch)."""
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == self.num_sequences:
                updates[f.name] = value[index.to(value.device)]
            elif hasattr(value, "select_rows"):  # a RouteStore: a view, no copy
                updates[f.name] = value.select_rows(index)
        for name in ("texts", "prompts"):
            values = getattr(self, name)
            updates[name] = [values[i] for i in index.tolist()] if values else []
        updates["rows"] = index
        updates["shared_prefix"] = None  # a layout of these rows is found again (Learner.micro_batch)
        return replace(self, **updates)

    def to(self, device: torch.device | str, *, skip: tuple[str, ...] = ()) -> Rollout:
        """Move tensors to ``device`` except those named in ``skip`` (routes stay on CPU)."""
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and f.name not in skip:
                updates[f.name] = value.to(device, non_blocking=True)
        return replace(self, **updates)
