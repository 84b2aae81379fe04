"""Synthetic Countdown instances, solvable by construction, and their prompt templates.

Project machines cannot download Jiayi-Pan/Countdown-Tasks-3to4, so instances are generated
(docs/algorithms.md §5, "data generation for offline environments"): sample 3-4 numbers in
``[1, max_number]``, combine them in a random binary tree using each number once, and keep the
instance when the value is an integer in ``[1, max_target]``. Like the Countdown game, every
intermediate result is a positive integer (``-`` only when the result is positive, ``/`` only
when exact), which keeps the generating expression (``"solution"``) simple to learn from.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

Template = Literal["tinyzero", "qwen-instruct", "compact"]
TEMPLATES: tuple[str, ...] = ("tinyzero", "qwen-instruct", "compact")

_TASK = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
_TINYZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.\nUser: " + _TASK + "\nAssistant: Let me solve this step by step.\n<think>"
)
# Verbatim TinyZero, including the space after "user\n".
_QWEN_INSTRUCT = (
    "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in the "
    "mind and then provides the user with the answer.<|im_end|>\n<|im_start|>user\n " + _TASK + "<|im_end|>\n"
    "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
_MAX_FAILED_DRAWS = 100_000


@dataclass(frozen=True)
class _Node:
    """A sub-expression: its text (minimal parentheses), integer value and precedence."""

    text: str
    value: int
    prec: int


def generate_countdown(
    n: int,
    *,
    seed: int | str,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 99,
    ops: str = "+-*/",
    max_target: int = 1000,
) -> list[dict[str, Any]]:
    """``n`` seeded Countdown rows ``{"numbers": [...], "target": int, "solution": str}``.

    ``numbers`` are shuffled; ``solution`` is the generating expression without spaces and with
    minimal parentheses (e.g. ``"(3+5)*7"``), using every number exactly once.
    """
    if n < 0:
        raise ValueError(f"countdown: n must be >= 0, got {n}")
    rows = iter_countdown(
        seed=seed,
        min_numbers=min_numbers,
        max_numbers=max_numbers,
        max_number=max_number,
        ops=ops,
        max_target=max_target,
    )
    return list(islice(rows, n))


def iter_countdown(
    *,
    seed: int | str,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 99,
    ops: str = "+-*/",
    max_target: int = 1000,
) -> Iterator[dict[str, Any]]:
    """Endless stream of Countdown rows (see :func:`generate_countdown`) from ``random.Random(seed)``."""
    check_settings(min_numbers, max_numbers, max_number, ops, max_target)
    rng = random.Random(seed)
    failed = 0
    while True:
        row = _draw(rng, min_numbers, max_numbers, max_number, ops, max_target)
        if row is not None:
            failed = 0
            yield row
            continue
        failed += 1
        if failed >= _MAX_FAILED_DRAWS:
            raise ValueError(
                f"countdown: no instance with a target in [1, {max_target}] in {failed} draws; "
                "check data.max_number / ops"
            )


def check_settings(
    min_numbers: int, max_numbers: int, max_number: int, ops: str = "+-*/", max_target: int = 1000
) -> None:
    """Raise a one-line ValueError naming the first bad generator setting."""
    if not 2 <= min_numbers <= max_numbers:
        raise ValueError(
            f"data.min_numbers/max_numbers: need 2 <= min <= max, got {min_numbers}, {max_numbers}"
        )
    if max_number < 1:
        raise ValueError(f"data.max_number: must be >= 1, got {max_number}")
    if not ops or set(ops) - set(_PREC):
        raise ValueError(f"countdown ops: expected a non-empty subset of '+-*/', got {ops!r}")
    if max_target < 1:
        raise ValueError(f"data.max_target: must be >= 1, got {max_target}")


def _draw(
    rng: random.Random, min_numbers: int, max_numbers: int, max_number: int, ops: str, max_target: int
) -> dict[str, Any] | None:
    """One random instance, or None when its value falls outside ``[1, max_target]``."""
    numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
    pool = [_Node(str(x), x, _ATOM) for x in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        valid = [op for op in ops if _allowed(op, a.value, b.value)]
        if not valid:
            return None
        pool = [node for k, node in enumerate(pool) if k not in (i, j)] + [_combine(a, rng.choice(valid), b)]
    root = pool[0]
    if not 1 <= root.value <= max_target:
        return None
    rng.shuffle(numbers)
    return {"numbers": numbers, "target": root.value, "solution": root.text}


def _allowed(op: str, a: int, b: int) -> bool:
    """Whether ``a op b`` is a positive integer (Countdown rules)."""
    if op == "-":
        return a > b
    if op == "/":
        return a % b == 0
    return True


def _combine(a: _Node, op: str, b: _Node) -> _Node:
    """``a op b`` with parentheses only where precedence or associativity needs them."""
    prec = _PREC[op]
    left = f"({a.text})" if a.prec < prec else a.text
    right = f"({b.text})" if b.prec < prec or (b.prec == prec and op in "-/") else b.text
    value = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value}.get(op)
    return _Node(left + op + right, a.value // b.value if value is None else value, prec)


def format_prompt(row: dict[str, Any], template: Template) -> str:
    """The prompt text of a Countdown ``row`` (``numbers``, ``target``) in ``template``.

    ``"tinyzero"``: TinyZero's base prompt (R1-style preamble, assistant turn prefilled up to
    ``<think>``); ``"qwen-instruct"``: the same in ChatML; ``"compact"``: ``"3 5 7 => 22 ="`` for
    character-level models, whose completion is the bare expression.
    """
    numbers, target = list(row["numbers"]), row["target"]
    if template == "compact":
        return f"{' '.join(map(str, numbers))} => {target} ="
    if template == "tinyzero":
        return _TINYZERO.format(numbers=numbers, target=target)
    if template == "qwen-instruct":
        return _QWEN_INSTRUCT.format(numbers=numbers, target=target)
    raise ValueError(f"data.template: expected one of {', '.join(TEMPLATES)}, got {template!r}")


def format_completion(row: dict[str, Any], template: Template) -> str:
    """A correct completion of ``row`` in ``template`` (for a supervised warm start).

    ``"compact"``: the bare solution (``"3*5+7"``); the tag templates close the prefilled
    ``<think>`` and put the solution in ``<answer>`` tags on the last line.
    """
    if template == "compact":
        return row["solution"]
    if template in ("tinyzero", "qwen-instruct"):
        return f" </think>\n<answer>{row['solution']}</answer>"
    raise ValueError(f"data.template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
