"""The calls :class:`~lit_moe_rl.module.MoERLModule` makes into this package, one function each, so that
the module itself holds only call sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_moe_rl.parallel.mixed_precision import (
    check_compute_dtype,
    low_precision_warning,
    mixed_precision_policy,
)
from lit_moe_rl.parallel.offload import offloaded
from lit_moe_rl.parallel.unshard import fsdp_units, unsharded

__all__ = [
    "check_memory_settings",
    "export_model",
    "gather_full_state",
    "generation_weights",
    "mixed_precision_policy",
    "warn_low_precision",
]


def is_sharded_strategy(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_memory_settings(module: Any, trainer: Any) -> None:
    """At ``setup``: the mixed-precision settings agree, and (``model.memory_check``) the planner says the
    run fits the detected GPU (:func:`lit_moe_rl.parallel.plan_check.refuse_if_not_fitting`)."""
    hp = module.hparams
    precision = str(getattr(trainer.strategy.precision_plugin, "precision", "32-true"))
    check_compute_dtype(
        hp.get("compute_dtype"),
        dtype=hp.dtype,
        precision=precision,
        sharded=is_sharded_strategy(trainer.strategy),
    )
    if hp.get("memory_check", True):
        from lit_moe_rl.parallel.plan_check import refuse_if_not_fitting

        refuse_if_not_fitting(module, trainer)


def warn_low_precision(module: Any) -> None:
    """One warning when full fine-tuning steps on bf16/fp16 weights at a small learning rate."""
    message = low_precision_warning(module.policy, module.hparams.lr, bool(module.hparams.lora))
    if message:
        rank_zero_warn(message)


def _optimizer(module: Any) -> torch.optim.Optimizer | None:
    trainer = getattr(module, "_trainer", None)
    optimizers = getattr(trainer, "optimizers", None) or []
    return optimizers[0] if optimizers else None


@contextlib.contextmanager
def generation_weights(module: Any) -> Iterator[nn.Module]:
    """The rollout's weights: optimizer state offloaded (``offload_optimizer``), the FSDP2 policy
    unsharded (``rollout_weights: unshard``, no resident copy); yields what the engine generates with."""
    hp = module.hparams
    with contextlib.ExitStack() as stack:
        if hp.get("offload_optimizer", False):
            stack.enter_context(offloaded(_optimizer(module)))
        if hp.get("rollout_weights", "resident") == "unshard" and not module._rollout_copy:
            stack.enter_context(unsharded(module.policy))
        yield module.rollout_policy()


def gather_full_state(module: Any) -> dict[str, Tensor] | None:
    """The full weights on rank 0's host (empty elsewhere) when the policy is sharded without a resident
    copy; None otherwise. A collective: every rank calls it."""
    if module._rollout_copy or not fsdp_units(module.policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module.policy, options=options)


def export_model(module: Any, state: dict[str, Tensor]) -> nn.Module:
    """A plain (unsharded) copy of the policy holding ``state``, built on the meta device then assigned;
    buffers (RoPE ``inv_freq``, never sharded) are copied from the policy."""
    import transformers

    from lit_moe_rl.lora import apply_lora
    from lit_moe_rl.sharding import _copy_buffers

    policy = module.policy
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(base.config)
        if module.hparams.lora:
            model = apply_lora(model, module.hparams.lora)
    model.load_state_dict(state, assign=True, strict=True)
    _copy_buffers(model, policy)
    return model.to("cpu")
