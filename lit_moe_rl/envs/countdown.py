"""Multi-turn Countdown with feedback: a wrong attempt is told its value and the target, up to 3 attempts.

Prompt ``"3 5 7 => 22 ="`` (the ``compact`` template), an attempt is the bare expression ended by EOS;
a wrong one gets the observation ``" = 17 => 22 ="`` (its value, then the target again: characters of
the built-in model's tokenizer) and the model tries again. Reward 1 for a solution within
``max_attempts``, else 0 (an attempt that is not a well-formed expression using the numbers is told
``" => 22 ="`` only). :meth:`metrics` reports the solved-within-k rate and the share of second attempts
that succeed after a failed first. :func:`synthetic_transcript` writes the warm start's transcripts
(a wrong attempt, its feedback, the solution) for ``lit-moe-rl sft`` with ``model.multiturn_fraction``.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

from lit_moe_rl.rewards.arith import ArithError, safe_eval
from lit_moe_rl.rewards.countdown import _ALLOWED, uses_numbers
from lit_moe_rl.rollout.env import Environment

__all__ = ["MultiTurnCountdown", "synthetic_transcript", "wrong_attempt"]


class MultiTurnCountdown(Environment):
    """Countdown in up to ``max_attempts`` turns, with the attempt's value as feedback."""

    thread_safe = True
    """Pure Python with bounded work (safe_eval): stepped in threads, not worker processes."""

    def __init__(self, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError(f"rollout.env.init_args.max_attempts: must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts

    def reset(self, sample: dict[str, Any], prompt: Any) -> Any:
        self.numbers, self.target = list(sample["numbers"]), int(sample["target"])
        self.outcomes: list[bool] = []
        return prompt

    def value(self, action: str) -> Fraction | None:
        """The attempt's exact value, or None when it is not a whitelisted expression of the numbers."""
        line = action.split("\n", 1)[0].strip()
        if not line or not _ALLOWED.match(line) or not uses_numbers(line, self.numbers):
            return None
        try:
            return Fraction(safe_eval(line)).limit_denominator(10_000)
        except (ArithError, ValueError, OverflowError):
            return None

    def step(self, action: str) -> tuple[str | None, float, bool]:
        value = self.value(action)
        solved = value is not None and value == self.target
        self.outcomes.append(solved)
        if solved or len(self.outcomes) >= self.max_attempts:
            return None, float(solved), True
        shown = "" if value is None else f" = {value}"
        return f"{shown} => {self.target} =", 0.0, False

    def metrics(self) -> dict[str, float | None]:
        """``solved`` within the attempts; ``second_after_fail``: the second attempt's success, when the
        first failed (None otherwise, so averages are shares of such trajectories)."""
        second = None if len(self.outcomes) < 2 else float(self.outcomes[1])
        return {"solved": float(any(self.outcomes)), "solved_first": float(self.outcomes[:1] == [True]),
                "second_after_fail": second}  # fmt: skip


_OPS = ("+", "-", "*")


def wrong_attempt(sample: dict[str, Any], rng: random.Random, tries: int = 20) -> str | None:
    """A well-formed attempt with the sample's numbers whose value is not the target (None if none found)."""
    env = MultiTurnCountdown()
    env.reset(sample, "")
    for _ in range(tries):
        numbers = [str(n) for n in sample["numbers"]]
        rng.shuffle(numbers)
        attempt = numbers[0] + "".join(rng.choice(_OPS) + n for n in numbers[1:])
        value = env.value(attempt)
        if value is not None and value != env.target:
            return attempt
    return None


def synthetic_transcript(sample: dict[str, Any], solution: str, rng: random.Random) -> list[tuple[str, bool]]:
    """``[(text, trained)]`` after the prompt: a wrong attempt and its feedback (untrained context), then
    the solution (trained). Each attempt is followed by EOS when tokenised (an attempt ends with EOS)."""
    attempt = wrong_attempt(sample, rng)
    if attempt is None:
        return [(solution, True)]
    env = MultiTurnCountdown()
    env.reset(sample, "")
    feedback, _, _ = env.step(attempt)
    return [(attempt, False), (feedback, False), (solution, True)]
