"""A small, safe arithmetic evaluator for Countdown answers.

TinyZero evaluates the model's equation with ``eval(..., {"__builtins__": None}, {})`` after a
character whitelist. We never call ``eval``: the string is parsed with :mod:`ast` and only
``+ - * /`` (binary), unary ``+ -`` and int/float literals are interpreted. The expression length
and every intermediate magnitude are bounded, so no input can hang or exhaust memory.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPR_CHARS = 200
"""Longest expression :func:`safe_eval` accepts."""
MAX_MAGNITUDE = 1e12
"""Largest absolute value any literal or intermediate result may have."""

_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARYOPS: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


class ArithError(ValueError):
    """An expression that :func:`safe_eval` refuses or cannot evaluate."""


def safe_eval(expr: str) -> float:
    """Value of the arithmetic expression ``expr`` (``+ - * /``, parentheses, unary ``±``, numbers).

    Raises:
        ArithError: on anything else (names, calls, ``**``, ``//``, ``%``, ...), syntax errors,
            division by zero, an expression longer than :data:`MAX_EXPR_CHARS` or a value above
            :data:`MAX_MAGNITUDE` in magnitude.
    """
    if not isinstance(expr, str):
        raise ArithError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_CHARS:
        raise ArithError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ArithError(f"not a valid expression: {e.__class__.__name__}") from None
    return float(_eval_node(tree.body))


def _eval_node(node: ast.AST) -> int | float:
    """Evaluate one AST node recursively, checking the magnitude of every result."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ArithError(f"literal {value!r} is not a number")
        return _bounded(value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ArithError("division by zero")
        return _bounded(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _bounded(_UNARYOPS[type(node.op)](_eval_node(node.operand)))
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        raise ArithError(f"operator {type(node.op).__name__} is not allowed")
    raise ArithError(f"{type(node).__name__} is not allowed")


def _bounded(value: int | float) -> int | float:
    """``value`` if finite and at most :data:`MAX_MAGNITUDE` in magnitude, else :class:`ArithError`."""
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ArithError(f"value out of range (|x| > {MAX_MAGNITUDE:g})")
    return value
