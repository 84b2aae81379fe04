"""The rollout engine's own copy of the policy in another dtype, with the dtypes a real engine loads.

``from_pretrained(path, dtype=torch.bfloat16)`` does not cast everything to bf16, and neither do
inference engines:

* non-persistent buffers computed at init (RoPE ``inv_freq`` / ``original_inv_freq``) stay float32
  with their float32 values; ``module.to(bfloat16)`` would round them (an angle error of about
  0.7 rad at position 4096 that no real engine has);
* the model class's ``_keep_in_fp32_modules_strict`` (bf16 and fp16) and ``_keep_in_fp32_modules``
  (fp16 only) stay float32: DeepSeek-V3's router ``gate.weight`` and ``e_score_correction_bias``.

:func:`inference_copy` applies that rule tensor by tensor while copying (HF's own rule and
pattern matching; no disk round trip, never two full-precision copies alive), and :func:`sync_into`
copies values while keeping each target tensor's dtype.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

__all__ = ["fp32_patterns", "inference_copy", "sync_into", "target_dtypes"]


def _pretrained(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Name patterns HF keeps in float32 when loading in ``dtype`` (its ``_get_dtype_plan`` rule):
    ``_keep_in_fp32_modules_strict`` for bf16 and fp16, ``_keep_in_fp32_modules`` for fp16 only."""
    base = _pretrained(model)
    patterns = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(base, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        patterns += list(getattr(base, "_keep_in_fp32_modules", None) or [])
    return [p.replace("*", ".*") for p in patterns]  # HF matches each glob with re.search


def target_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``name -> dtype`` of every floating parameter and buffer as ``from_pretrained(dtype=dtype)`` gives it.

    Non-persistent buffers keep their dtype (HF computes them at init, never loads them); names that
    match :func:`fp32_patterns` get float32; every other floating tensor gets ``dtype``.
    """
    keep_fp32 = re.compile("|".join(fp32_patterns(model, dtype)) or r"(?!)")
    keep = _non_persistent_buffers(model)
    dtypes = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if name in keep:
            dtypes[name] = tensor.dtype
        elif keep_fp32.search(name):
            dtypes[name] = torch.float32
        else:
            dtypes[name] = dtype
    return dtypes


def inference_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen eval-mode deep copy of ``policy`` with :func:`target_dtypes`; tensors are cast while
    copied (each is converted once, so at most one full-precision model is ever alive)."""
    dtypes = target_dtypes(policy, dtype)
    memo: dict[int, object] = {}
    for name, param in policy.named_parameters(remove_duplicate=True):
        cast = param.detach().to(dtypes.get(name, param.dtype), copy=True)
        memo[id(param)] = nn.Parameter(cast, requires_grad=False)
    for name, buf in policy.named_buffers(remove_duplicate=True):
        memo[id(buf)] = buf.detach().to(dtypes.get(name, buf.dtype), copy=True)
    return copy.deepcopy(policy, memo).eval().requires_grad_(False)


@torch.no_grad()
def sync_into(target: nn.Module, source: nn.Module) -> None:
    """Copy every parameter and persistent buffer of ``source`` into ``target``, each in its target dtype."""
    params = dict(target.named_parameters())
    for name, param in source.named_parameters():
        params[name].copy_(param.detach())
    buffers = dict(target.named_buffers())
    skip = _non_persistent_buffers(source)
    for name, buf in source.named_buffers():
        if name not in skip:
            buffers[name].copy_(buf.detach())
