"""Switching ``model.algorithm`` to another class resets its init_args to the new class's defaults.

jsonargparse carries a previous class's init_args across a ``class_path`` change whenever the new class
accepts a parameter of that name. For the algorithms that is a trap: ``configs/quickstart.yaml`` sets GRPO's
``clip_low: 0.2, clip_high: 0.28``, and ``--model.algorithm=GSPO`` on top of it would run GSPO with a token
clip 500x its sequence clip (3e-4 / 4e-4, GSPO paper), or GMPO/RSPO with 0.2 / 0.28 in log space instead of
0.4 / 0.4. So for :class:`~lit_moe_rl.algorithms.Algorithm` subclasses a class change starts from the new
class's defaults, and one line on stderr names each value that was dropped and the default that replaces it.
init_args given *after* the class (``--model.algorithm=GSPO --model.algorithm.clip_low=1e-3``) apply as
usual. Other class-typed settings (loggers, engines, callbacks) keep jsonargparse's behaviour.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import Any

_NOTED: set[str] = set()


def install() -> None:
    """Wrap jsonargparse's ``discard_init_args_on_class_path_change`` (idempotent)."""
    from jsonargparse import _typehints

    original = _typehints.discard_init_args_on_class_path_change
    if getattr(original, "_resets_algorithms", False):
        return

    @functools.wraps(original)
    def discard(parser_or_action: Any, prev_val: Any, value: Any) -> None:
        reset_algorithm_init_args(prev_val, value)
        original(parser_or_action, prev_val, value)

    discard._resets_algorithms = True  # type: ignore[attr-defined]
    _typehints.discard_init_args_on_class_path_change = discard


def reset_algorithm_init_args(prev_val: Any, value: Any) -> str | None:
    """Empty ``prev_val``'s init_args when both specs name different Algorithm classes; return the notice."""
    try:
        prev_path, new_path = prev_val["class_path"], value["class_path"]
        prev_args = prev_val["init_args"]
    except (KeyError, TypeError):
        return None
    if not prev_args or prev_path == new_path:
        return None
    new_class = _algorithm_class(new_path)
    if new_class is None or _algorithm_class(prev_path) is None:
        return None
    carried = dict(prev_args.items()) if hasattr(prev_args, "items") else dict(prev_args)
    for key in list(carried):
        prev_args.pop(key)
    notice = switch_notice(prev_path, new_class, carried)
    if notice and notice not in _NOTED:
        _NOTED.add(notice)
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
            print(f"lit-moe-rl: {notice}", file=sys.stderr)
    return notice


def switch_notice(prev_path: str, new_class: type, carried: dict[str, Any]) -> str | None:
    """``model.algorithm: GRPO -> GSPO starts from GSPO's defaults: clip_low 0.2 -> 0.0003, ...`` (values the
    new class accepts and that differ from its default), or None when nothing changes."""
    params = inspect.signature(new_class.__init__).parameters
    changes = [
        f"{key} {value!r} -> {params[key].default!r}"
        for key, value in carried.items()
        if key in params
        and params[key].default is not inspect.Parameter.empty
        and value != params[key].default
    ]
    if not changes:
        return None
    old, new = prev_path.rsplit(".", 1)[-1], new_class.__name__
    return (
        f"model.algorithm: {old} -> {new} starts from {new}'s defaults: {', '.join(changes)} "
        f"(to keep a value, set it after --model.algorithm, e.g. --model.algorithm.{changes[0].split()[0]}=...)"
    )


def _algorithm_class(path: Any) -> type | None:
    from lit_moe_rl.algorithms import Algorithm

    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return None
    return cls if inspect.isclass(cls) and issubclass(cls, Algorithm) else None
