"""Router adapters: where the MoE routers of a Hugging Face model are, and how each family gates.

R3 (rollout routing replay, Ma et al., arXiv 2510.11370 §4.1) forces the training forward to use
the expert ids the inference engine picked, while the gate weights come from the *live* training
router logits restricted to those ids. "Restricted" follows the family's own gating (docs/algorithms.md
§3.6 pitfall 1), so each router class gets one small :class:`RouterAdapter`:

* softmax routers (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral): ``softmax(logits)[ids]`` over all
  experts, renormalised over the K ids iff the model renormalises (``norm_topk_prob``; Mixtral
  always). With renormalisation this is exactly the R3 gate formula.
* DeepSeek-V3: ``sigmoid(logits)[ids]`` (the ``e_score_correction_bias`` only selects, it never
  weights), normalised if ``norm_topk_prob`` (+1e-20 as HF), times ``routed_scaling_factor``.
  Not in either paper: an extrapolation of R3 to sigmoid routers.
* GPT-OSS: ``softmax(logits[ids])``, the softmax over the K selected raw logits.

Every adapter repeats its router's arithmetic op for op, so that replaying a model's own routes is
bit-exact. Routers are found by class name only; a module that looks like a router (a ``gate`` or
``router`` beside an ``experts`` module) of an unknown class is an error naming the class, because
guessing its gate formula would silently train a different model. :func:`register_adapter` adds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "MoERouter",
    "RouterAdapter",
    "SigmoidTopKAdapter",
    "SoftmaxTopKAdapter",
    "TopKLogitSoftmaxAdapter",
    "adapter_for",
    "find_moe_routers",
    "in_backward_recompute",
    "moe_layout",
    "register_adapter",
    "route_dtype",
]


class RouterAdapter:
    """Gate weights for GIVEN expert ids from live router logits, following one family's gating."""

    def gate_weights(self, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``logits [n, E]``, ``indices [n, K]`` (int64) -> ``[n, K]`` in the router's weights dtype."""
        raise NotImplementedError


@dataclass(frozen=True)
class SoftmaxTopKAdapter(RouterAdapter):
    """Qwen3-MoE / Qwen2-MoE / OLMoE / Mixtral: full softmax in fp32, gathered at ``indices``.

    ``renormalize=None`` reads ``router.norm_topk_prob`` (Qwen/OLMoE); Mixtral passes ``True``.
    ``out_dtype="logits"`` casts back to the logits dtype (Qwen/OLMoE); Mixtral keeps float32.
    """

    renormalize: bool | None = None
    out_dtype: Literal["logits", "float32"] = "logits"

    def gate_weights(self, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights = probs.gather(1, indices)
        renormalize = router.norm_topk_prob if self.renormalize is None else self.renormalize
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype) if self.out_dtype == "logits" else weights


@dataclass(frozen=True)
class SigmoidTopKAdapter(RouterAdapter):
    """DeepSeek-V3: sigmoid scores gathered at ``indices`` (no correction bias), optional
    normalisation (``norm_topk_prob``, +1e-20 as HF), times ``routed_scaling_factor``; float32."""

    def gate_weights(self, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        weights = logits.sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor


@dataclass(frozen=True)
class TopKLogitSoftmaxAdapter(RouterAdapter):
    """GPT-OSS: softmax over the raw logits (router bias included) gathered at ``indices``."""

    def gate_weights(self, router: nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        selected = logits.gather(1, indices)
        return torch.softmax(selected, dim=1, dtype=selected.dtype)


_ADAPTERS: dict[str, RouterAdapter] = {
    "Qwen3MoeTopKRouter": SoftmaxTopKAdapter(),
    "Qwen2MoeTopKRouter": SoftmaxTopKAdapter(),
    "OlmoeTopKRouter": SoftmaxTopKAdapter(),
    "MixtralTopKRouter": SoftmaxTopKAdapter(renormalize=True, out_dtype="float32"),
    "DeepseekV3TopkRouter": SigmoidTopKAdapter(),
    "GptOssTopKRouter": TopKLogitSoftmaxAdapter(),
}
_ROUTER_CHILD_NAMES = ("gate", "router")


def register_adapter(router_class_name: str, adapter: RouterAdapter) -> None:
    """Teach the library a router class whose forward returns ``(logits, weights, indices)``."""
    _ADAPTERS[router_class_name] = adapter


def adapter_for(router: nn.Module) -> RouterAdapter:
    """The adapter registered for ``type(router).__name__``; ValueError naming the class otherwise."""
    name = type(router).__name__
    if name not in _ADAPTERS:
        raise ValueError(
            f"routing: no RouterAdapter for router class {name}; its gate formula is unknown, so routes "
            f"cannot be replayed. Register one: lit_moe_rl.routing.adapters.register_adapter({name!r}, ...)"
        )
    return _ADAPTERS[name]


@dataclass
class MoERouter:
    """One MoE router of a model. ``layer`` is the MoE-layer ordinal 0..L-1 (dense layers skipped);
    ``block`` is the MoE block that calls it (sees the 3-D hidden states), None if unknown."""

    name: str
    module: nn.Module
    layer: int
    num_experts: int
    top_k: int
    adapter: RouterAdapter
    block: nn.Module | None = None


_PEFT_WRAPPED = (".base_layer", ".modules_to_save.default")  # where PEFT keeps the module it wraps


def _unwrapped_name(name: str) -> str:
    """``name`` without PEFT's wrapper suffixes: ``...mlp.gate.base_layer`` -> ``...mlp.gate``."""
    stripped = True
    while stripped:
        stripped = False
        for suffix in _PEFT_WRAPPED:
            if name.endswith(suffix):
                name, stripped = name.removesuffix(suffix), True
    return name


def _is_router(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    if (
        hasattr(module, "base_layer")
        or hasattr(module, "original_module")
        or name.endswith(".original_module")
    ):
        return False  # a PEFT wrapper (its wrapped router is found under it) or the frozen pre-LoRA copy
    if type(module).__name__ in _ADAPTERS:
        return True
    parent, _, child = _unwrapped_name(name).rpartition(".")
    parent_module = modules.get(parent)
    return child in _ROUTER_CHILD_NAMES and parent_module is not None and hasattr(parent_module, "experts")


def _router_attr(module: nn.Module, name: str, attr: str) -> int:
    value = getattr(module, attr, None)
    if not isinstance(value, int):
        raise ValueError(
            f"routing: router {name} ({type(module).__name__}) has no integer `{attr}` attribute"
        )
    return value


def find_moe_routers(model: nn.Module) -> list[MoERouter]:
    """The model's routers in ``named_modules()`` order (works through a peft wrapper); [] if dense."""
    modules = dict(model.named_modules())
    routers = []
    for name, module in modules.items():
        if not _is_router(name, module, modules):
            continue
        parent = _unwrapped_name(name).rpartition(".")[0]
        routers.append(
            MoERouter(
                name=name,
                module=module,
                layer=len(routers),
                num_experts=_router_attr(module, name, "num_experts"),
                top_k=_router_attr(module, name, "top_k"),
                adapter=adapter_for(module),
                block=modules.get(parent) if "." in name else None,
            )
        )
    return routers


def moe_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(num_moe_layers, top_k, num_experts)``; ``(0, 0, 0)`` for a dense model."""
    routers = find_moe_routers(model)
    if not routers:
        return 0, 0, 0
    shapes = {(r.top_k, r.num_experts) for r in routers}
    if len(shapes) > 1:
        raise ValueError(f"routing: routers disagree on (top_k, num_experts): {sorted(shapes)}")
    top_k, num_experts = shapes.pop()
    return len(routers), top_k, num_experts


def route_dtype(num_experts: int) -> torch.dtype:
    """Smallest signed int that holds ids 0..E-1 and the -1 "no route" marker."""
    if num_experts <= 128:
        return torch.int8
    return torch.int16 if num_experts <= 32767 else torch.int32


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass: a router call then is an activation-checkpointing
    recompute (reentrant or not), not a new forward."""
    return torch._C._current_graph_task_id() != -1


def call_shape(router: MoERouter, router_input: torch.Tensor, block_shapes: dict[int, tuple[int, int]]):
    """The ``(B, S)`` of the current router call: its own input if 3-D (DeepSeek-V3), else the shape
    the MoE block's pre-hook saw; None when neither is known."""
    if router_input.dim() == 3:
        return tuple(router_input.shape[:2])
    return block_shapes.get(router.layer)


def track_block_shapes(routers: list[MoERouter], block_shapes: dict[int, tuple[int, int]]) -> list:
    """Forward pre-hooks on each router's MoE block that save the ``(B, S)`` of its 3-D hidden states
    (routers receive them flattened). Returns the hook handles."""

    def make_hook(layer: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                block_shapes[layer] = tuple(hidden.shape[:2])

        return hook

    return [
        r.block.register_forward_pre_hook(make_hook(r.layer), with_kwargs=True)
        for r in routers
        if r.block is not None
    ]
