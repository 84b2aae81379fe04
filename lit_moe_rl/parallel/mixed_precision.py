"""fp32 master weights with bf16 compute: FSDP2's ``MixedPrecisionPolicy``.

With ``model.compute_dtype: bfloat16`` the sharded parameters, their gradients and AdamW's state stay
float32 (the *master* weights the optimizer steps on); each FSDP2 unit all-gathers its parameters
cast to bf16 for the forward and backward, and gradients are reduce-scattered in float32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, PyTorch's FSDP2 docs,
``torch.distributed.fsdp.MixedPrecisionPolicy``; Micikevicius et al. 2018, "Mixed Precision Training").

Why it matters: with bf16 weights (``trainer.precision: bf16-true``) an AdamW update ``lr * m/sqrt(v)``
smaller than half a bf16 step of the weight (2^-9 relative) rounds away. At lr 1e-6 that is nearly
every update: the run logs a loss and learns almost nothing. :func:`low_precision_warning` says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
SMALL_LR = 1e-4  # below it, most AdamW steps on bf16 weights of typical size (~1e-2) round away


def mixed_precision_policy(compute_dtype: str | None) -> Any:
    """FSDP2's policy for ``compute_dtype`` (params all-gathered in it, fp32 reduction), or None."""
    if compute_dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[compute_dtype], reduce_dtype=torch.float32)


def check_compute_dtype(compute_dtype: str | None, *, dtype: str, precision: str, sharded: bool) -> None:
    """``model.compute_dtype`` needs FSDP2, float32 weights and a precision that keeps them float32."""
    from lit_moe_rl.errors import SettingsError

    if compute_dtype is None:
        return
    if not sharded:
        raise SettingsError(
            "model.compute_dtype: needs FSDP2 (trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy, "
            "data_parallel_size >= 1); without it use trainer.precision: bf16-mixed for fp32 weights and bf16 compute"
        )
    if dtype != "float32":
        raise SettingsError(
            f"model.compute_dtype: the master weights must be float32 (model.dtype is {dtype}); set model.dtype: float32"
        )
    if "true" in str(precision) and not str(precision).startswith("32"):
        raise SettingsError(
            f"model.compute_dtype: trainer.precision {precision} casts the master weights to low precision; "
            "set trainer.precision: 32-true (FSDP2 casts to model.compute_dtype for the forward and backward)"
        )


def low_precision_warning(policy: nn.Module, lr: float, lora: bool) -> str | None:
    """One line when full fine-tuning trains low-precision weights at a learning rate whose AdamW updates
    round away (< :data:`SMALL_LR`), naming the fix; None otherwise."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    if lora or not trained or lr >= SMALL_LR:
        return None
    dtype = trained[0].dtype
    if dtype not in LOW_PRECISION:
        return None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return (
        f"model.lr: {lr:g} on {name} weights (full fine-tuning): most AdamW updates are below half a {name} step "
        "and round away, so the weights barely move; keep fp32 master weights: trainer.precision: 32-true, "
        f"model.dtype: float32, model.compute_dtype: {'bfloat16' if name == 'bf16' else 'float16'} (FSDP2), "
        "or trainer.precision: bf16-mixed on one device"
    )


def moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The fraction of elements of ``before``'s tensors that differ in ``after`` (the test's measure)."""
    changed = total = 0
    for name, value in before.items():
        changed += int((after[name].float() != value.float()).sum())
        total += value.numel()
    return changed / max(total, 1)
