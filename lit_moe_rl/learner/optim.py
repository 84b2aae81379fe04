"""The optimizer of RL fine-tuning: AdamW with a linear learning-rate warm-up, stepped once per update.

The MoE routers' parameters may form a group of their own with ``lr * router_lr_scale``: the RSPO paper's
router shift lives where the router moves relative to the rest of the policy, and a router learning
rate of its own moves it without moving the experts and attention faster too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lit_moe_rl.errors import SettingsError


def router_parameter_ids(model: torch.nn.Module) -> set[int]:
    """``id`` of every trainable parameter under an MoE router (a LoRA on the router included)."""
    from lit_moe_rl.routing.adapters import find_moe_routers

    return {id(p) for r in find_moe_routers(model) for p in r.module.parameters() if p.requires_grad}


def param_groups(model: torch.nn.Module, *, lr: float, router_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: the trainable parameters at ``lr``; with ``router_lr_scale != 1`` the
    routers' parameters in a second group at ``lr * router_lr_scale`` (named ``router``).

    Raises a one-line :class:`SettingsError` when a scale is set but no router parameter is trained (a
    dense model, or LoRA with ``router: frozen``): the setting would silently do nothing.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    if router_lr_scale == 1.0:
        return [{"params": trained, "lr": lr, "name": "policy"}]
    router = router_parameter_ids(model)
    if not router:
        raise SettingsError(
            f"model.router_lr_scale: {router_lr_scale} needs trained router parameters, and the policy has "
            "none (a dense model, or lora.router: frozen)"
        )
    return [
        {"params": [p for p in trained if id(p) not in router], "lr": lr, "name": "policy"},
        {"params": [p for p in trained if id(p) in router], "lr": lr * router_lr_scale, "name": "router"},
    ]


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter (floating point, on a device it has the
    kernel for). It is one kernel over all of a step's tensors; torch's CPU default loops over them
    (18.6 ms against 2.7 ms a step for the 47 tensors, 7.1M parameters, of ``bench/vs_trl.py``'s model on
    2 threads). Elsewhere torch picks (``fused=None``)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter] | list[dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (parameters, those that require grad, or groups from :func:`param_groups`)
    and a scheduler scaling every group's rate by ``min(1, (step + 1) / (warmup_steps + 1))``."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [p for p in params if p.requires_grad]
    trained = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    opt = torch.optim.AdamW(
        groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused_supported(trained) or None
    )
    warmup = max(warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return opt, sched
