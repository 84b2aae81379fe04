"""``self.log`` without re-moving metrics that are already on the device.

Lightning (2.6) moves a logged value's stored metric to the value's device on every ``self.log`` call:
``_ResultMetric.to`` runs ``apply_to_collection`` over the metric's whole ``__dict__`` (a torchmetrics
``Metric``: its states, its ``nn.Module`` bookkeeping, and its metadata dataclass, which that walk
deep-copies each time). This trainer logs about 30 metrics per step; on the quickstart that was
11-16 ms of a 120-230 ms step, three quarters of it in those moves, which moved nothing.

:func:`install` wraps ``_ResultMetric.to`` with a check: when the target is one ``torch.device`` and
every tensor the metric holds (its states, their defaults, its cached forward value: the tensors in
its ``__dict__`` and in the dicts and lists there) is already on it, and it holds no nested metric,
the call returns the metric as it is, which is what the full walk returns, less the copy. Any other
call takes Lightning's own path. A Lightning without that class or method is left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["install"]

_ORIGINAL: Any = None  # Lightning's _ResultMetric.to, once wrapped


_PLAIN = (str, int, float, bool, type(None), torch.device, torch.dtype)


def _already_on(value: Any, device: torch.device, depth: int = 0) -> bool:
    """Whether every tensor in ``value`` (a tensor, or dicts and lists of them two levels deep) is on
    ``device``; False for anything the full walk would have to move or descend into further."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, Tensor):
        return value.device == device
    if isinstance(value, dict):
        return depth < 2 and all(_already_on(v, device, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return depth < 2 and all(_already_on(v, device, depth + 1) for v in value)
    if isinstance(value, Metric):
        return False
    return not dataclasses.is_dataclass(value)  # the walk descends into dataclasses (metadata aside)


def _to(self, *args: Any, **kwargs: Any) -> Any:
    """``_ResultMetric.to`` that returns at once when nothing would move (module docstring)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.device):
        device = args[0]
        # ``meta``: Lightning's _Metadata (names, flags, reduce and sync functions), which holds no tensor
        if all(name == "meta" or _already_on(value, device) for name, value in vars(self).items()):
            return self
    return _ORIGINAL(self, *args, **kwargs)


def install() -> bool:
    """Wrap Lightning's ``_ResultMetric.to`` (idempotent); False where this Lightning has none."""
    global _ORIGINAL
    try:
        from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
    except ImportError:
        return False
    if _ORIGINAL is None:
        if not callable(getattr(_ResultMetric, "to", None)):
            return False
        _ORIGINAL = _ResultMetric.to
        _ResultMetric.to = _to
    return True
