"""Range checks of the module's numeric settings, run in ``__init__`` before any model loads.

| setting | allowed | why |
|---|---|---|
| ``model.lr`` | > 0, finite | AdamW's step size |
| ``model.router_lr_scale`` | > 0, finite | the routers' learning rate over ``lr`` |
| ``model.weight_decay`` | >= 0 | AdamW's decoupled decay |
| ``model.betas`` | each in [0, 1) | AdamW's moment decay rates |
| ``model.warmup_steps`` | >= 0 | linear warm-up length in optimizer steps |
| ``model.grad_clip`` | >= 0 (0 = no clipping) | a negative norm would silently disable clipping |
| ``model.logprob_chunk_size`` | >= 1 or null | response tokens (across rows) per LM-head chunk (null: by device) |
| ``model.router_aux_loss_coef`` | >= 0 | weight of the load-balancing loss |
| ``model.lora`` | rank >= 1, alpha > 0, dropout in [0, 1), router frozen/full/adapted | known keys only (:mod:`lit_moe_rl.lora`) |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lit_moe_rl.errors import SettingsError


def check_module_settings(
    *,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    warmup_steps: int,
    grad_clip: float,
    logprob_chunk_size: int | None,
    router_aux_loss_coef: float,
    lora: dict[str, Any] | None = None,
    prefix: str = "model",
) -> None:
    """Raise a one-line :class:`SettingsError` naming ``<prefix>.<setting>`` for a value out of range."""
    if not (lr > 0 and math.isfinite(lr)):
        raise SettingsError(f"{prefix}.lr: must be a finite number > 0, got {lr}")
    at_least(f"{prefix}.weight_decay", weight_decay, 0)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise SettingsError(f"{prefix}.betas: must be two numbers in [0, 1), got {list(betas)}")
    at_least(f"{prefix}.warmup_steps", warmup_steps, 0)
    at_least(f"{prefix}.grad_clip", grad_clip, 0, note=" (0 turns clipping off)")
    if logprob_chunk_size is not None:
        at_least(f"{prefix}.logprob_chunk_size", logprob_chunk_size, 1)
    at_least(f"{prefix}.router_aux_loss_coef", router_aux_loss_coef, 0)
    if lora:
        from lit_moe_rl.lora import check_lora_settings

        check_lora_settings(lora, f"{prefix}.lora")


def at_least(setting: str, value: float, low: float, note: str = "") -> None:
    """``value >= low`` and finite, else a one-line :class:`SettingsError` (NaN is refused too)."""
    if not (value >= low and math.isfinite(value)):
        raise SettingsError(f"{setting}: must be >= {low}{note}, got {value}")


def check_rl_module_settings(hp: Any) -> None:
    """The RL module's ``model.*`` settings (``hp``: its hyperparameters), before any model loads: a model
    source, positive batch sizes, the ranges above, an existing ``pretrained`` folder, a known correction."""
    if hp["pretrained"] is None and hp["config"] is None:
        raise ValueError("model: set model.pretrained (a local folder or builtin:<name>) or model.config")
    for name in ("mini_batches", "micro_batch_size"):
        if hp[name] < 1:
            raise ValueError(f"model.{name}: must be >= 1, got {hp[name]}")
    if not ((scale := hp.get("router_lr_scale", 1.0)) > 0 and math.isfinite(scale)):
        raise SettingsError(f"model.router_lr_scale: must be a finite number > 0, got {scale}")
    names = (
        "lr",
        "weight_decay",
        "betas",
        "warmup_steps",
        "grad_clip",
        "logprob_chunk_size",
        "router_aux_loss_coef",
    )
    check_module_settings(**{name: hp[name] for name in names}, lora=hp["lora"])
    if hp["pretrained"] is not None:
        from lit_moe_rl.policy import resolve_pretrained

        resolve_pretrained(hp["pretrained"])  # fail before any work on a missing folder
    from lit_moe_rl.experts import check_experts_implementation

    check_experts_implementation(hp.get("experts_implementation", "auto"))
    from lit_moe_rl.learner.old_pass import check_correction

    check_correction(hp["correction"], hp["correction_args"] or {})
