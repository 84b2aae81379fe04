"""The optimizer of RL fine-tuning: AdamW with a linear learning-rate warm-up, stepped once per update."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_with_warmup(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (those that require grad) and a scheduler scaling the rate by
    ``min(1, (step + 1) / (warmup_steps + 1))``."""
    trained = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    warmup = max(warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return opt, sched
