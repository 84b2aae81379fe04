"""The environment interface of multi-turn rollouts: the model acts, the environment answers.

One :class:`Environment` instance per trajectory. ``reset(sample, prompt)`` returns the first prompt
(text or chat messages; default: the row's prompt), ``step(action_text)`` returns ``(observation,
reward, done)`` where the observation is text, a list of chat messages, or None. The trajectory's
reward is the sum of its step rewards (or the rollout's reward function on the whole transcript, when
one is set). ``stop_strings`` pause a row besides every EOS id (e.g. ``"</tool_call>"``).

A ten-line environment (named in YAML as ``rollout.env: {class_path: my_pkg.Guess, init_args: {}}``)::

    class Guess(Environment):
        def reset(self, sample, prompt):
            self.target, self.tries = sample["target"], 0
            return prompt

        def step(self, action):
            self.tries += 1
            if action.strip() == str(self.target):
                return None, 1.0, True
            return "no, again:", 0.0, self.tries >= 3
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lit_moe_rl.rollout.prompts import Prompt

__all__ = ["Environment", "Observation", "StepResult", "env_factory", "import_path"]

Observation = str | list[dict[str, Any]] | None


@dataclass
class StepResult:
    """What one ``step`` returned, or how it failed (``error``: it raised; ``timed_out``: past the deadline)."""

    observation: Observation = None
    reward: float = 0.0
    done: bool = True
    error: str | None = None
    timed_out: bool = False


class Environment:
    """Base class of a multi-turn environment (override :meth:`step`, optionally :meth:`reset`)."""

    stop_strings: tuple[str, ...] = ()
    """Text that ends a turn besides the EOS ids (the turn then ends with it, nothing after it is sampled)."""

    def reset(self, sample: dict[str, Any], prompt: Prompt) -> Prompt:
        """Start a trajectory for dataset row ``sample``; return its first prompt (default: the row's)."""
        return prompt

    def step(self, action: str) -> tuple[Observation, float, bool]:
        """The model's turn ``action`` (decoded sampled text) -> ``(observation, reward, done)``."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float | None]:
        """Optional per-trajectory values, averaged into ``multiturn/env/<name>`` (None: not applicable)."""
        return {}


def import_path(path: str, setting: str = "rollout.env.class_path") -> Any:
    """The object at ``module:attr``, ``module.attr`` or ``path/to/file.py:attr`` (the reward loader's rules)."""
    from lit_moe_rl.rewards.registry import _import

    try:
        return _import(path)
    except ValueError as err:
        raise ValueError(str(err).replace("rollout.reward:", f"{setting}:", 1)) from None


def env_factory(spec: Any) -> Callable[[], Environment]:
    """A zero-argument constructor from ``{class_path, init_args}``, an import path, a class or a factory."""
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"rollout.env: expected {{class_path: ..., init_args: {{...}}}}, got {spec!r}")
        cls, args = import_path(spec["class_path"]), dict(spec.get("init_args") or {})
        return lambda: cls(**args)
    if isinstance(spec, str):
        return import_path(spec)
    if callable(spec):
        return spec
    raise ValueError(
        f"rollout.env: expected {{class_path: ..., init_args: {{...}}}} or a class, got {spec!r}"
    )
