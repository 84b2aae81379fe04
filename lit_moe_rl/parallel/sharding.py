"""FSDP2 for the policy, applied in ``configure_model`` under Lightning's ``ModelParallelStrategy``.

``fully_shard`` wraps every decoder layer, then the whole model (embeddings, final norm, LM head), on
the strategy's data-parallel mesh: each rank holds ``1/W`` of every weight, gradient and AdamW state,
and a layer's full weights exist only while it runs. Works on CPU with gloo (the CI runs 2 processes)
and on CUDA with NCCL; Lightning's ``FSDPStrategy`` (FSDP1) refuses CPU.

Generation needs full weights and a per-rank loop whose length differs between ranks (each stops at
its own EOS), which sharded forwards (collectives) cannot run. So a sharded policy keeps a rank-local,
unsharded *rollout copy*, refreshed after every optimizer step with :func:`sync_full_copy`: the
rollout engine binds to it, R3 records its routes there, and the sharded training forward replays them.
The copy costs one full set of weights per rank (in the training dtype; a bf16 engine keeps its own
bf16 copy of it): the price of generating without collectives. ``model.rollout_weights: unshard``
generates with the policy itself instead, all-gathered for the rollout only
(:mod:`lit_moe_rl.parallel.unshard`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lit_moe_rl.parallel.distributed import full_tensor

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


def decoder_layers(policy: nn.Module) -> list[nn.Module]:
    """The decoder layers of an HF causal LM (``model.layers``), through a PEFT wrapper if any."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ValueError(
            f"trainer.strategy: cannot find the decoder layers of {type(base).__name__} to shard"
        )
    return list(layers)


def data_parallel_mesh(module: LightningModule) -> Any:
    """The strategy's data-parallel device mesh, or None when the strategy does not shard."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "trainer.strategy.tensor_parallel_size: tensor parallelism is not supported; set it to 1 and "
            "data_parallel_size to the number of devices"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def shard_policy(policy: nn.Module, mesh: Any, mp_policy: Any = None) -> nn.Module:
    """``fully_shard`` each decoder layer, the decoder (embeddings, final norm) and the LM head on
    ``mesh`` (FSDP2); returns ``policy``.

    The decoder and the head are separate units, not one root: the log-prob pass calls them apart
    (the head in chunks, :func:`lit_moe_rl.policy.token_logprobs`), never the model's own forward.
    ``mp_policy``: FSDP2's ``MixedPrecisionPolicy`` (:mod:`lit_moe_rl.parallel.mixed_precision`), or None.
    """
    from torch.distributed.fsdp import fully_shard

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(base.get_decoder(), mesh=mesh, **kwargs)
    fully_shard(base.get_output_embeddings(), mesh=mesh, **kwargs)
    return policy


def unsharded_copy(policy: nn.Module) -> nn.Module:
    """A frozen, rank-local copy of ``policy`` taken before sharding (the rollout copy)."""
    return copy.deepcopy(policy).eval().requires_grad_(False)


@torch.no_grad()
def place_full_copy(full: nn.Module, sharded: nn.Module, device: torch.device) -> None:
    """Give the full copy the sharded policy's dtypes and buffers, on ``device`` (no collective).

    The copy is taken in ``configure_model``, before Lightning's precision plugin casts the policy
    (``bf16-true``: ``module.to(bfloat16)``, buffers included) and moves it: each parameter takes the
    policy's dtype here, and each buffer (RoPE ``inv_freq``) the policy's own value and dtype, so that
    generation and training compute with the same tensors. Call it before the engine binds to the copy.
    """
    params = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        target = params[name]
        if target.dtype != param.dtype:
            target.data = target.data.to(param.dtype)
    _copy_buffers(full, sharded)
    full.to(device)


def _copy_buffers(full: nn.Module, sharded: nn.Module) -> None:
    """Replace every buffer of ``full`` by a copy of ``sharded``'s (value, dtype and device; FSDP2 does
    not shard buffers)."""
    for name, buf in sharded.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = full.get_submodule(owner_name) if owner_name else full
        if leaf in owner._buffers:
            owner._buffers[leaf] = buf.detach().clone()


@torch.no_grad()
def sync_full_copy(full: nn.Module, sharded: nn.Module) -> None:
    """Copy the sharded policy's weights and buffers into its full copy (a collective per sharded
    parameter: every rank must call it at the same point)."""
    target = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        target[name].copy_(full_tensor(param.detach()))
    _copy_buffers(full, sharded)


FSDP1_REFUSED = (
    "trainer.strategy: Lightning's FSDPStrategy (FSDP1) cannot run this trainer (manual_backward inside "
    "its wrapped forward fails: 'Expects BACKWARD_PRE or BACKWARD_POST state', Lightning issues #19626, "
    "#19685); use FSDP2: strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy}"
)


def refuse_fsdp1(strategy: Any) -> None:
    """Raise :class:`~lit_moe_rl.errors.SettingsError` (one line) when ``trainer.strategy`` is Lightning's
    FSDP v1: a registered name (``fsdp``, ``fsdp_cpu_offload``), a ``class_path`` or an instance of
    ``FSDPStrategy`` or a subclass. Checked before the Trainer is built (which on a CPU machine would
    refuse FSDP for another reason) and again when the module is set up."""
    from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

    from lit_moe_rl.errors import SettingsError

    if isinstance(strategy, str):
        entry = dict.get(StrategyRegistry, strategy.lower())  # the registry's own get() instantiates
        cls = entry["strategy"] if entry else _import_class(strategy)
    elif isinstance(strategy, FSDPStrategy):
        cls = FSDPStrategy
    else:
        path = strategy.get("class_path") if hasattr(strategy, "get") else None
        cls = _import_class(path) if isinstance(path, str) else None
    if isinstance(cls, type) and issubclass(cls, FSDPStrategy):
        raise SettingsError(FSDP1_REFUSED)


def _import_class(path: str) -> Any:
    """The class at dotted ``path``, or None when it is not one (Lightning reports bad names itself)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


class RolloutCopy:
    """A sharded (FSDP2) policy's full copy that the rollout engine generates with.

    Held outside the module tree (not a submodule, never checkpointed). :meth:`get` first gives it the
    policy's dtypes, buffers and device (:func:`place_full_copy`): Lightning casts and moves the policy
    after ``configure_model`` took the copy, and an engine binding to it copies what it finds."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.model = unsharded_copy(policy)
        self.placement: tuple | None = None  # (device, dtype) place_full_copy matched

    def get(self, policy: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        placement = (device, next(policy.parameters()).dtype)
        if self.placement != placement:
            place_full_copy(self.model, policy, device)
            self.placement = placement
        return self.model

    def sync(self, policy: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Refresh the copy from the sharded ``policy`` (a collective: every rank calls it)."""
        sync_full_copy(self.get(policy, device), policy)
        return self.model
