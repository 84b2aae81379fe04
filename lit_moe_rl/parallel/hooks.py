"""The calls :class:`~lit_moe_rl.module.MoERLModule` makes into this package, one function each, so that
the module itself holds only call sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_moe_rl.parallel.mixed_precision import (
    check_compute_dtype,
    low_precision_warning,
    mixed_precision_policy,
)
from lit_moe_rl.parallel.offload import offloaded
from lit_moe_rl.parallel.rank0_load import full_state, load_on_rank0, loads_on_rank0, receive_shards
from lit_moe_rl.parallel.sharding import RolloutCopy, shard_policy
from lit_moe_rl.parallel.unshard import fsdp_units, unsharded

__all__ = [
    "check_memory_settings",
    "export_model",
    "gather_full_state",
    "generation_weights",
    "mixed_precision_policy",
    "warn_low_precision",
]

if TYPE_CHECKING:
    from lit_moe_rl.module import MoERLModule


def is_sharded_strategy(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(module: MoERLModule, trainer: Any) -> None:
    """Before the model is built: Lightning's FSDP v1 refused, the memory settings checked."""
    from lit_moe_rl.parallel.sharding import refuse_fsdp1

    refuse_fsdp1(trainer.strategy)
    check_memory_settings(module, trainer)


def check_memory_settings(module: MoERLModule, trainer: Any) -> None:
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


def warn_low_precision(module: MoERLModule) -> None:
    """One warning when full fine-tuning steps on bf16/fp16 weights at a small learning rate."""
    message = low_precision_warning(module.policy, module.hparams.lr, bool(module.hparams.lora))
    if message:
        rank_zero_warn(message)


def _optimizer(module: MoERLModule) -> torch.optim.Optimizer | None:
    optimizers = getattr(module.learner, "optimizer", None) if module.learner is not None else None
    optimizers = [getattr(optimizers, "optimizer", optimizers)] if optimizers is not None else []
    return optimizers[0] if optimizers else None


@contextlib.contextmanager
def generation_weights(module: MoERLModule) -> Iterator[nn.Module]:
    """The rollout's weights: optimizer state offloaded (``offload_optimizer``), the FSDP2 policy
    unsharded (``rollout_weights: unshard``, no resident copy); yields what the engine generates with."""
    hp = module.hparams
    with contextlib.ExitStack() as stack:
        if hp.get("offload_optimizer", False):
            stack.enter_context(offloaded(_optimizer(module)))
        if hp.get("rollout_weights", "resident") == "unshard" and module.rollout_copy is None:
            stack.enter_context(unsharded(module.policy))
        yield module.rollout_policy()


def gather_full_state(module: MoERLModule) -> dict[str, Tensor] | None:
    """The full weights on rank 0's host (empty elsewhere) when the policy is sharded without a resident
    copy; None otherwise. A collective: every rank calls it."""
    if module.rollout_copy is not None or not fsdp_units(module.policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module.policy, options=options)


def export_model(module: MoERLModule, state: dict[str, Tensor]) -> nn.Module:
    """A plain (unsharded) copy of the policy holding ``state``, built on the meta device then assigned;
    buffers (RoPE ``inv_freq``, never sharded) are copied from the policy."""
    import transformers

    from lit_moe_rl.lora import apply_lora
    from lit_moe_rl.parallel.sharding import _copy_buffers

    policy = module.policy
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(base.config)
        if module.hparams.lora:
            model = apply_lora(model, module.hparams.lora)
    model.load_state_dict(state, assign=True, strict=True)
    _copy_buffers(model, policy)
    return model.to("cpu")


def shard_loaded(policy: nn.Module, mesh: Any, compute_dtype: str | None, rank0: bool) -> nn.Module:
    """FSDP2-shard a loaded ``policy`` with the mixed-precision policy of ``compute_dtype``; when rank 0
    alone read the weights (``rank0``, :mod:`.rank0_load`), the other ranks then receive their shards."""
    state = full_state(policy) if rank0 else None
    shard_policy(policy, mesh, mp_policy=mixed_precision_policy(compute_dtype))
    if rank0:
        receive_shards(policy, state)
    return policy


def policy_loader(hp: Any, mesh: Any) -> tuple[Any, bool]:
    """``load_policy``, or rank 0's load with one host copy per node (:func:`.rank0_load.loads_on_rank0`)."""
    from lit_moe_rl.policy import load_policy

    rank0 = loads_on_rank0(hp, mesh)
    return (load_on_rank0 if rank0 else load_policy), rank0


def initial_policy(module: MoERLModule) -> nn.Module:
    """The policy ``module``'s run started from (same ``model.*`` source and seed), without LoRA, on its
    device, sharded like its policy (FSDP2, rank-0 loading), with the policy's experts kernel on every rank
    (a rank that builds a skeleton under rank-0 loading would otherwise run transformers' default kernel):
    the reference of a resumed or sharded run."""
    from lit_moe_rl.experts import apply_experts_implementation
    from lit_moe_rl.parallel.sharding import data_parallel_mesh

    hp, seed, device, mesh = module.hparams, module.init_seed, module.device, data_parallel_mesh(module)
    loader, rank0 = policy_loader(hp, mesh)
    policy, _ = loader(
        hp["pretrained"], hp["config"], dtype=hp["dtype"], tokenizer=hp["tokenizer"], seed=seed
    )
    apply_experts_implementation(policy, hp.get("experts_implementation", "auto"))
    policy.config.use_cache = False
    if not rank0:
        policy.to(device)
    if mesh is None:
        return policy
    shard_loaded(policy, mesh, hp.get("compute_dtype"), rank0)
    return policy.to(device) if rank0 else policy


def build_policy(
    hp: Any, *, seed: int, router_shift: bool, mesh: Any
) -> tuple[nn.Module, Any, RolloutCopy | None]:
    """The RL policy of the module's ``model.*`` settings ``hp`` (:func:`~lit_moe_rl.policy.build_rl_policy`),
    loaded by rank 0 alone where that applies, and under FSDP2 (``mesh``) sharded after taking the full
    copy to generate with (``rollout_weights: resident``). Returns ``(policy, tokenizer, rollout copy)``."""
    from lit_moe_rl.policy import build_rl_policy

    loader, rank0 = policy_loader(hp, mesh)  # one host copy per node (rank0_load.py)
    policy, tokenizer, zeroed = build_rl_policy(hp, seed=seed, router_shift=router_shift, loader=loader)
    if zeroed:  # the one mode of every forward; the engine toggles its own
        rank_zero_warn(f"model: {zeroed} dropout/noise probabilities set to 0 (RL trains without dropout)")
    copy = None
    if mesh is not None:  # FSDP2 (ModelParallelStrategy)
        copy = RolloutCopy(policy) if hp.get("rollout_weights", "resident") == "resident" else None
        shard_loaded(policy, mesh, hp.get("compute_dtype"), rank0)
    return policy, tokenizer, copy
