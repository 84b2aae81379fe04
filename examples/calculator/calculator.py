"""A tool environment in a few lines: the model may call ``calculate`` before it answers.

Named in YAML as ``rollout.env: {class_path: examples/calculator/calculator.py:CalculatorEnv}``.
The final answer (a turn without a tool call) earns 1 when its last number is the row's ``answer``.
"""

from __future__ import annotations

import re

from lit_moe_rl.envs.tools import ToolEnv
from lit_moe_rl.rewards.arith import safe_eval


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Integers with + - * / and parentheses, e.g. "(12+3)*4".
    """
    value = safe_eval(expression)
    return str(int(value)) if float(value).is_integer() else str(value)


class CalculatorEnv(ToolEnv):
    def __init__(self, max_calls: int = 2) -> None:
        super().__init__(tools=[calculate], max_calls=max_calls, system="Answer with a number.")

    def final_reward(self, action: str) -> float:
        numbers = re.findall(r"-?\d+", action)
        return float(bool(numbers) and int(numbers[-1]) == int(self.sample["answer"]))
