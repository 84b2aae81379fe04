"""``model.torch_compile``: ``torch.compile`` of the learner's forward and backward, routers left eager.

The setting is ``false`` (default), ``true`` (torch's defaults: backend ``inductor``, mode ``default``,
dynamic shapes) or a mapping ``{backend, mode, dynamic}`` of :func:`torch.compile`'s arguments
(HF ``TrainingArguments`` names them ``torch_compile_backend`` / ``torch_compile_mode``).

What is compiled (PyTorch's "compile the repeated block" recipe, regional compilation): inside each decoder
layer, every submodule that holds no MoE router (attention, norms, dense MLPs) and, inside each MoE block,
every child but the router (the experts, shared experts). Identical layers share one compiled graph per kind
of submodule, so the compile time does not grow with depth; ``dynamic`` shapes let micro-batches of other
lengths (``trim_padding``) reuse it instead of recompiling.

What is not: the routers and the MoE blocks that call them run eagerly, so each MoE layer is a graph break.
Routing replay (R3, arXiv 2510.11370 §4.1), route recording and RSPO's router-logit capture
(arXiv 2510.23027) are forward hooks on the routers and pre-hooks on their blocks, registered per
micro-batch; a compiled region runs the hooks that existed when it was traced, not those registered later
(dynamo does not guard on module hooks: ``torch._dynamo.config.skip_nnmodule_hook_guards``), so the
replayed routes would be silently ignored. Eager routers see every call, and the compiled update equals the
eager one (tests/test_compile.py).

Only the learner's π_old and update forwards (and their backward, which recomputes checkpointed layers)
run compiled: the compiled calls are installed (``nn.Module._compiled_call_impl``, what
``nn.Module.compile`` sets) for the learner's forward context only, so the rollout engine's decode loop,
with its KV cache and route recording, stays eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_moe_rl.errors import SettingsError, close_matches

SETTING = "model.torch_compile"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KEYS = ("backend", "mode", "dynamic")


@dataclass(frozen=True)
class CompileSettings:
    """:func:`torch.compile`'s arguments for each compiled submodule (see the module docstring)."""

    backend: str = "inductor"
    mode: str = "default"
    dynamic: bool | None = True  # None: torch's default (static first, dynamic after a shape change)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`torch.compile` (``mode`` is inductor's alone)."""
        mode = {"mode": self.mode} if self.backend == "inductor" else {}
        return {"backend": self.backend, "dynamic": self.dynamic, **mode}


def parse_torch_compile(value: Any, setting: str = SETTING) -> CompileSettings | None:
    """``model.torch_compile``'s value as :class:`CompileSettings` (None: off), or a one-line
    :class:`~lit_moe_rl.errors.SettingsError` naming the setting."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileSettings()
    if not isinstance(value, dict):
        raise SettingsError(
            f"{setting}: must be true, false or a mapping of {', '.join(KEYS)}; got {value!r}"
        )
    for key in value:
        if key not in KEYS:
            raise SettingsError(
                f"{setting}: unknown key {key!r}{close_matches(str(key), KEYS)}; known: {', '.join(KEYS)}"
            )
    settings = CompileSettings(**value)
    check_mode_backend(settings, setting)
    if settings.dynamic not in (True, False, None):
        raise SettingsError(f"{setting}.dynamic: must be true, false or null, got {settings.dynamic!r}")
    return settings


def check_mode_backend(settings: CompileSettings, setting: str) -> None:
    """``mode`` one of inductor's, and only with inductor; ``backend`` one that torch has registered."""
    if settings.mode not in MODES:
        raise SettingsError(
            f"{setting}.mode: unknown {settings.mode!r}{close_matches(str(settings.mode), MODES)}; "
            f"choose one of {', '.join(MODES)}"
        )
    if settings.mode != "default" and settings.backend != "inductor":
        raise SettingsError(
            f"{setting}.mode: {settings.mode!r} is the inductor backend's, not {settings.backend!r}"
        )
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(settings.backend, str) or settings.backend not in backends:
        raise SettingsError(
            f"{setting}.backend: unknown {settings.backend!r}{close_matches(str(settings.backend), backends)}; "
            f"common: {', '.join(sorted(torch._dynamo.list_backends()))}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.get_decoder().layers``), or a one-line error."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SettingsError(f"{SETTING}: {type(model).__name__} has no decoder `layers` list to compile")
    return layers


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to compile: within each decoder layer, the largest ones that hold no MoE router.

    A submodule that holds a router (the MoE block, a LoRA wrapper of the router) is descended into, and the
    router itself skipped, so that routers and their blocks run eagerly with whatever hooks they have."""
    from lit_moe_rl.routing.adapters import find_moe_routers

    routers = {id(r.module) for r in find_moe_routers(model)}
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in routers:
                continue
            if isinstance(child, nn.ModuleDict | nn.ModuleList) or any(
                id(m) in routers for m in child.modules()
            ):
                visit(child)  # a container is never called itself (PEFT's lora_A dicts): its modules are
            elif any(True for _ in child.parameters()) or any(True for _ in child.children()):
                units.append(child)

    for layer in decoder_layers(model):
        visit(layer)
    return units


class CompiledPolicy:
    """A policy's compiled submodules (:func:`compile_units`), installed by :meth:`active` only."""

    def __init__(self, policy: nn.Module, settings: CompileSettings) -> None:
        self.settings = settings
        self.units = compile_units(policy)
        kwargs = settings.kwargs()
        self.calls = [torch.compile(unit._call_impl, **kwargs) for unit in self.units]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, each unit's ``__call__`` runs its compiled call (as after ``unit.compile()``)."""
        saved = [unit._compiled_call_impl for unit in self.units]
        for unit, call in zip(self.units, self.calls, strict=True):
            unit._compiled_call_impl = call
        try:
            yield
        finally:
            for unit, previous in zip(self.units, saved, strict=True):
                unit._compiled_call_impl = previous


def compiled_policy(policy: nn.Module, value: Any) -> CompiledPolicy | None:
    """The :class:`CompiledPolicy` of ``model.torch_compile``'s ``value``, or None when it is off."""
    settings = parse_torch_compile(value)
    return CompiledPolicy(policy, settings) if settings is not None else None
