"""Turn a reward setting (an instance, a short name or an import path) into a reward callable."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_moe_rl.rewards.base import RewardFn
from lit_moe_rl.rewards.countdown import CountdownReward
from lit_moe_rl.rewards.math import MathReward

BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "countdown": CountdownReward,
    "countdown_plain": lambda: CountdownReward(format="plain"),
    "math": MathReward,
}
"""Short names accepted by :func:`resolve_reward`."""


def resolve_reward(spec: RewardFn | str) -> RewardFn:
    """The reward callable named by ``spec``.

    ``spec`` is a callable (returned as is), a short name from :data:`BUILTIN_REWARDS`, an import
    path ``"package.module:attr"`` / ``"package.module.attr"`` (``attr`` may be dotted after a
    colon), or a file ``"path/to/reward.py:attr"``. A class found at the path is instantiated with no arguments.

    Raises:
        ValueError: one line naming ``reward`` when the path cannot be imported, the class cannot
            be instantiated, or the result is not callable.
    """
    if isinstance(spec, str):
        if spec in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[spec]()
        obj = _import(spec)
        if inspect.isclass(obj):
            obj = _instantiate(obj, spec)
    else:
        obj = spec
    if inspect.ismodule(obj):
        raise ValueError(
            f"rollout.reward: {spec!r} is a module, not a function: name the function after a colon, "
            f"{spec + ':<function>'!r}"
        )
    if not callable(obj):
        raise ValueError(f"rollout.reward: {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def _import(path: str) -> Any:
    """The object at ``"module:attr"``, ``"module.attr"`` or ``"path/to/file.py:attr"``, or a one-line ValueError.

    A ``.py`` file is imported as a module named after the file, with its folder put on ``sys.path``
    (so that reward worker processes, which start with the parent's ``sys.path``, import it too).
    """
    module_name, sep, attr = path.partition(":")
    if not sep and path.endswith(".py"):
        raise ValueError(
            f"rollout.reward: {path!r} names a file but no function in it: write {path + ':<function>'!r}"
        )
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        if not module_name or not attr:
            raise ImportError(
                "expected 'package.module:function', 'package.module.function' or 'file.py:function'"
            )
        if module_name.endswith(".py"):
            module_name = _add_file_folder(module_name)
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise ValueError(f"rollout.reward: cannot import {path!r} ({_one_line(e)})") from None
    return obj


def _add_file_folder(file: str) -> str:
    """Put ``file``'s folder first on ``sys.path``; return the module name (the file's stem)."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"no such file {file!r}")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return path.stem


def _instantiate(cls: type, path: str) -> Any:
    """``cls()``, or a one-line ValueError naming ``reward``."""
    try:
        return cls()
    except Exception as e:
        raise ValueError(
            f"rollout.reward: cannot instantiate {path!r} with no arguments ({_one_line(e)})"
        ) from None


def _one_line(e: BaseException) -> str:
    """``"Type: first line of the message"``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
