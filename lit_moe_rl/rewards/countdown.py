"""Countdown reward: TinyZero's rule-based ``compute_score`` (docs/algorithms.md §5), evaluated safely.

Rules of the ``"tags"`` format, in TinyZero's order:

1. Cut after the first ``"Assistant:"`` or ``"<|im_start|>assistant"``.
2. Keep only the last line; take the last ``<answer>...</answer>`` on it. None -> ``0``.
3. The sorted integers of the equation must equal the sorted ``numbers``, else ``format_score``.
4. The equation must match ``^[\\d+\\-*/().\\s]+$`` and evaluate without error, else ``format_score``.
5. ``|value - target| < 1e-5`` -> ``score``, else ``format_score``.

Deviations from TinyZero:

- TinyZero scores the decoded prompt + response, so a missing marker means reward 0. Here the
  completion is the response only: when it contains a marker, the text is cut after it as in
  TinyZero; otherwise the whole completion is the response.
- ``eval`` is replaced by :func:`~lit_moe_rl.rewards.arith.safe_eval` (an ``ast`` walker with
  length and magnitude bounds); every expression TinyZero's whitelist admits and ``eval``
  accepts evaluates to the same value, up to the 1e12 magnitude bound.

The ``"plain"`` format is for tiny models whose completion is the bare expression (prompt
``"3 5 7 => 22 ="``, completion ``"3*5+7"``): the first line, stripped, must be non-empty and match
the whitelist (else ``0``); then rules 3-5 apply.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from lit_moe_rl.rewards.arith import ArithError, safe_eval

_MARKERS = ("Assistant:", "<|im_start|>assistant")
_ANSWER = re.compile(r"<answer>(.*?)</answer>")
_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")
_INT = re.compile(r"\d+")


def extract_answer(completion: str) -> str | None:
    """The equation in the last ``<answer>`` tag of the last line (TinyZero rules 1-2), or None."""
    for marker in _MARKERS:
        if marker in completion:
            completion = completion.split(marker, 1)[1]
            break
    matches = _ANSWER.findall(completion.split("\n")[-1])
    return matches[-1].strip() if matches else None


def uses_numbers(equation: str, numbers: list[int]) -> bool:
    """True when the integers in ``equation`` are exactly ``numbers`` (as multisets; rule 3)."""
    return sorted(int(n) for n in _INT.findall(equation)) == sorted(int(n) for n in numbers)


class CountdownReward:
    """TinyZero's Countdown reward (``"tags"``) or its bare-expression variant (``"plain"``).

    Args:
        format: ``"tags"``: answer in ``<answer>`` tags on the last line (TinyZero prompts);
            ``"plain"``: the completion's first line is the expression (the ``compact`` template).
        format_score: reward of a well-formed answer that is wrong (wrong numbers, bad characters,
            an evaluation error, or a wrong value).
        score: reward of a correct answer.

    The sample must carry ``numbers`` (list of int) and ``target`` (number).
    """

    thread_safe = True
    """Pure Python with bounded work (:func:`safe_eval`): scored in threads, not worker processes."""

    def __init__(
        self, format: Literal["tags", "plain"] = "tags", format_score: float = 0.1, score: float = 1.0
    ):
        if format not in ("tags", "plain"):
            raise ValueError(f"reward.format: expected 'tags' or 'plain', got {format!r}")
        self.format = format
        self.format_score = float(format_score)
        self.score = float(score)

    def __call__(self, completion: str, sample: dict[str, Any]) -> float:
        """Reward of ``completion`` for the Countdown instance ``sample``."""
        numbers, target = _instance(sample)  # first: rows without the fields fail on every call
        equation = extract_answer(completion) if self.format == "tags" else _first_line(completion)
        if equation is None:
            return 0.0
        if not uses_numbers(equation, numbers) or not _ALLOWED.match(equation):
            return self.format_score
        try:
            value = safe_eval(equation)
        except ArithError:
            return self.format_score
        return self.score if abs(value - target) < 1e-5 else self.format_score

    def __repr__(self) -> str:
        return (
            f"CountdownReward(format={self.format!r}, format_score={self.format_score}, score={self.score})"
        )


def _first_line(completion: str) -> str | None:
    """The stripped first line when it is a non-empty whitelisted expression, else None."""
    line = completion.split("\n", 1)[0].strip()
    return line if line and _ALLOWED.match(line) else None


def _instance(sample: dict[str, Any]) -> tuple[list[int], float]:
    """``(numbers, target)`` from a sample, with an error naming a missing field."""
    missing = [k for k in ("numbers", "target") if k not in sample]
    if missing:
        raise KeyError(f"countdown reward: sample has no {' or '.join(map(repr, missing))} field")
    return list(sample["numbers"]), float(sample["target"])
