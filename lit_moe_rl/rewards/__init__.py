"""Reward functions: Countdown (TinyZero rules), math (math-verify), user callables by import path."""

from lit_moe_rl.rewards.base import RewardFn, score_batch
from lit_moe_rl.rewards.countdown import CountdownReward
from lit_moe_rl.rewards.math import MathReward
from lit_moe_rl.rewards.registry import resolve_reward

__all__ = ["CountdownReward", "MathReward", "RewardFn", "resolve_reward", "score_batch"]
