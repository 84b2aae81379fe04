"""``fit`` refuses at start a run the memory planner says cannot fit the detected GPU.

The GPU's memory is the CUDA device's (``torch.cuda.get_device_properties``), or
``LIT_MOE_RL_GPU_MEMORY_GIB`` when set (to plan for another card, and for tests on CPU). CPU runs
without the variable are not checked. ``model.memory_check: false`` skips the check."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L

from lit_moe_rl.parallel.plan import GiB, Plan, format_plan, make_plan, suggest_fixes
from lit_moe_rl.parallel.plan_config import settings_from_config
from lit_moe_rl.parallel.plan_shape import config_from_settings, model_shape

ENV = "LIT_MOE_RL_GPU_MEMORY_GIB"


def gpu_capacity(trainer: Any) -> int | None:
    """Bytes of one GPU of this run (see the module docstring), or None when not checked."""
    if os.environ.get(ENV):
        return int(float(os.environ[ENV]) * GiB)
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(device).total_memory


def run_config(module: L.LightningModule, trainer: L.Trainer) -> dict:
    """The live run's settings in the shape of a ``fit`` config file."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_moe_rl.callbacks.rollout import RolloutCallback

    rollout = next((c for c in trainer.callbacks if isinstance(c, RolloutCallback)), None)
    engine = getattr(rollout, "engine", None)
    hp = dict(module.hparams)
    hp["algorithm"] = {"init_args": {"kl_coef": getattr(module.algorithm, "kl_coef", 0.0)}}
    budget = getattr(rollout, "max_batch_tokens", None) or getattr(engine, "max_batch_tokens", None)
    engine_args = {k: getattr(engine, k, None) for k in ("max_new_tokens", "dtype", "max_prompt_len")}
    return {
        "trainer": {
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "precision": str(trainer.precision),
            "strategy": {"class_path": "ModelParallelStrategy"}
            if isinstance(trainer.strategy, ModelParallelStrategy) else None,
            "callbacks": [{"class_path": type(c).__name__} for c in trainer.callbacks],
        },
        "model": hp,
        "data": {"batch_size": getattr(trainer.datamodule, "batch_size", 2)},
        "rollout": {
            "group_size": getattr(rollout, "group_size", 8),
            "max_batch_tokens": budget,
            "engine": {"init_args": {k: v for k, v in engine_args.items() if v is not None}},
        },
    }  # fmt: skip


def run_plan(
    module: L.LightningModule, trainer: L.Trainer, capacity: int | None, prompt_tokens: int | None = None
) -> Plan:
    """The plan of the live run (``prompt_tokens``: the prompts' padded length, when known)."""
    config = run_config(module, trainer)
    settings = settings_from_config(config, prompt_tokens=prompt_tokens)
    hp = module.hparams
    shape = model_shape(config_from_settings(hp.pretrained, hp.config, settings.notes), hp.lora)
    return make_plan(shape, settings, capacity)


def refuse_if_not_fitting(module: L.LightningModule, trainer: L.Trainer) -> None:
    """Print the plan and raise a one-line :class:`SettingsError` when it says the run cannot fit."""
    from lit_moe_rl.errors import SettingsError

    capacity = gpu_capacity(trainer)
    if capacity is None:
        return
    plan = run_plan(module, trainer, capacity)
    if plan.fits:
        return
    if trainer.is_global_zero:
        print(format_plan(plan, "this run"), file=sys.stderr)
    phase = "generation" if plan.generation_peak >= plan.update_peak else "update"
    raise SettingsError(
        f"model.memory_check: the memory plan needs {plan.peak / GiB:.1f} GiB per GPU in the {phase}, more than "
        f"the {plan.usable / GiB:.1f} GiB usable of this {plan.capacity / GiB:.1f} GiB GPU (breakdown above); it "
        f"would fit with: {'; '.join(suggest_fixes(plan))}; set model.memory_check: false to start anyway"
    )
