"""Group-relative advantage estimators and DAPO group filtering, as pure tensor functions.

``rewards`` is ``[N]`` with ``N = num_groups * G``, ordered so that rows ``[g*G, (g+1)*G)`` are the
``G`` completions of prompt ``g`` (the :class:`lit_moe_rl.batch.Rollout` layout). Everything
returned is detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["drgrpo_advantages", "group_filter_mask", "group_stats", "grpo_advantages"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``[N]`` rewards as a float ``[N/G, G]`` view; validates ``group_size``."""
    if group_size < 2:
        raise ValueError(f"group_size: must be >= 2 for group-normalised advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size: rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    r = rewards.detach()
    r = r if r.is_floating_point() else r.to(torch.float32)
    return r.view(-1, group_size)  # [N/G, G]


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    unbiased_std: bool = True,
) -> Tensor:
    """GRPO outcome advantage ``Â_i = (r_i - mean_g r) / (std_g r + eps)``, shared by all tokens of y_i.

    DeepSeekMath (Shao et al. 2024, arXiv 2402.03300) §4.1.2 outcome supervision; restated in GSPO
    (arXiv 2507.18071) Eq. (3); docs/algorithms.md §2.1. ``eps = 1e-6`` is added to the std as in verl.
    ``unbiased_std=True`` uses the ``G - 1`` (Bessel) denominator, as verl's ``torch.std``; the papers
    do not specify. A group with equal rewards gets advantage 0. ``norm_by_std=False`` gives
    Dr. GRPO's mean-only advantage (:func:`drgrpo_advantages`). Returns ``[N]``.
    """
    r = _grouped(rewards, group_size)  # [N/G, G]
    out_dtype = r.dtype
    r = r.double()  # a reward of 1e30 squares to 1e60 in the std: inf in float32, fine in float64
    centred = r - r.mean(dim=-1, keepdim=True)  # [N/G, G]
    if norm_by_std:
        centred = centred / (r.std(dim=-1, keepdim=True, correction=int(unbiased_std)) + eps)
    return centred.reshape(-1).to(out_dtype)  # [N]


def drgrpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO advantage ``Â_i = r_i - mean_g r`` (no std division: removes the difficulty bias).

    Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) §3.2 / "Dr. GRPO Modification 2" in the oat code;
    docs/algorithms.md §2.2. Returns ``[N]``.
    """
    return grpo_advantages(rewards, group_size, norm_by_std=False)


def group_filter_mask(rewards: Tensor, group_size: int, *, tol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: ``[N]`` bool, False on every row of a group whose rewards are all equal.

    DAPO (Yu et al. 2025, arXiv 2503.14476) §3.2 Dynamic Sampling, constraint ``0 < |{o_i correct}| < G``,
    generalised to real-valued rewards: a group is kept iff ``max - min > tol``. docs/algorithms.md §2.3.
    """
    r = _grouped(rewards, group_size)  # [N/G, G]
    keep = (r.amax(dim=-1) - r.amin(dim=-1)) > tol  # [N/G]
    return keep[:, None].expand_as(r).reshape(-1)  # [N]


def group_stats(rewards: Tensor, group_size: int) -> dict[str, Tensor]:
    """Per-batch group diagnostics (detached scalars).

    - ``zero_std_frac``: fraction of groups whose rewards are all equal (zero advantage signal;
      the groups DAPO's filter drops).
    - ``group_std_mean``: mean over groups of the (unbiased) within-group reward std.
    """
    r = _grouped(rewards, group_size)  # [N/G, G]
    flat = (r.amax(dim=-1) == r.amin(dim=-1)).to(r.dtype)  # [N/G]
    return {"zero_std_frac": flat.mean(), "group_std_mean": r.std(dim=-1).mean()}
