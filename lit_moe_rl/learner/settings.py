"""The learner's settings: the RL step's knobs, as the LightningModule's ``model.*`` arguments name them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CorrectionKind = Literal["none", "token_tis", "seq_tis", "icepop", "token_rejection", "geo_rejection"]


@dataclass
class LearnerSettings:
    """What one RL step does with a rollout (documented on :class:`~lit_moe_rl.module.MoERLModule`)."""

    mini_batches: int = 1
    micro_batch_size: int = 16
    grad_clip: float = 1.0
    logprob_chunk_size: int | None = None
    router_aux_loss_coef: float = 0.0
    correction: CorrectionKind = "none"
    correction_args: dict[str, float] = field(default_factory=dict)
    old_logp_pass: Literal["auto", "always"] = "auto"
    trim_padding: bool = True
    shared_prefix: Literal["auto", "off"] | bool = "auto"  # YAML reads an unquoted off as false
    skip_padding: bool = True
    track_router_shift: bool = False
    torch_compile: bool | dict[str, Any] = False

    def __post_init__(self) -> None:
        if isinstance(self.shared_prefix, bool):  # false: off; true: wherever the forward can (auto)
            self.shared_prefix = "auto" if self.shared_prefix else "off"

    @classmethod
    def from_hparams(cls, hparams: Any) -> LearnerSettings:
        """The settings among a module's hyperparameters (a mapping of ``model.*`` values)."""
        names = cls.__dataclass_fields__
        values = {name: hparams[name] for name in names if name in hparams}
        values["correction_args"] = dict(values.get("correction_args") or {})
        return cls(**values)
