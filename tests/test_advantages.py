"""Hand-worked checks of lit_moe_rl.advantages."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moe_rl.advantages import drgrpo_advantages, group_filter_mask, group_stats, grpo_advantages

# Two groups of G = 4:
#   group 0: [1, 0, 0, 1], mean 0.5, squared deviations 4 x 0.25 = 1
#            unbiased std = sqrt(1/3), biased std = sqrt(1/4) = 0.5
#   group 1: [2, 2, 2, 5], mean 2.75, squared deviations 3 x 0.5625 + 5.0625 = 6.75
#            unbiased std = sqrt(6.75/3) = 1.5
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_grpo_advantages_by_hand():
    a = 0.5 / math.sqrt(1 / 3)  # 0.866
    close(grpo_advantages(REWARDS, 4), [a, -a, -a, a, -0.5, -0.5, -0.5, 1.5])


def test_grpo_advantages_eps_is_added_to_std():
    adv = grpo_advantages(REWARDS, 4, eps=0.5)
    close(adv[4:], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / 2.0)  # std 1.5 + eps 0.5


def test_grpo_advantages_biased_std():
    close(grpo_advantages(REWARDS, 4, unbiased_std=False)[:4], [1.0, -1.0, -1.0, 1.0])  # 0.5 / 0.5


def test_drgrpo_advantages_by_hand():
    expected = [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]
    close(drgrpo_advantages(REWARDS, 4), expected)
    close(grpo_advantages(REWARDS, 4, norm_by_std=False), expected)


def test_equal_group_gets_zero_advantage_and_int_rewards_work():
    adv = grpo_advantages(torch.tensor([3, 3, 3, 1, 0, 1]), 3)
    assert adv.dtype == torch.float32
    close(adv[:3], [0.0, 0.0, 0.0])
    assert torch.isfinite(adv).all()


def test_group_size_validation():
    with pytest.raises(ValueError, match="group_size: must be >= 2 for group-normalised advantages, got 1"):
        grpo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(REWARDS, 3)  # 8 rows do not split into groups of 3
    with pytest.raises(ValueError, match="group_size"):
        group_filter_mask(REWARDS, 1)


def test_group_filter_mask_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    keep = group_filter_mask(rewards, 4)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True] * 4 + [False] * 8
    near = torch.tensor([0.5, 0.5 + 1e-9, 0.0, 1.0])
    assert group_filter_mask(near, 2, tol=1e-6).tolist() == [False, False, True, True]


def test_group_stats():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    stats = group_stats(rewards, 4)
    close(stats["zero_std_frac"], 2 / 3)
    close(stats["group_std_mean"], 0.5 / 3)  # group 0: mean 0.75, sq dev 3/16 + 9/16 = 0.75; /3 -> std 0.5
