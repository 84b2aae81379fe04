"""Run the environment steps of all paused trajectories concurrently, each under a deadline.

Every ``reset``/``step`` runs in a daemon thread of its own; the caller waits at most ``timeout_s``
for the whole set. A step that raises ends its trajectory with the error (counted, never raised); a
step still running at the deadline ends its trajectory as timed out (counted) and its thread is
abandoned: a hung environment costs a thread, never the run. (An environment that holds the GIL in
a C loop is the one case a thread cannot survive; reward workers' process isolation is the model for
that, not built here.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lit_moe_rl.rollout.env import Environment, StepResult

__all__ = ["run_concurrently", "step_all", "unpack_step"]


def run_concurrently(calls: list[Callable[[], Any]], timeout_s: float) -> list[tuple[str, Any]]:
    """``[(status, value)]`` per call: ``("ok", result)``, ``("error", message)`` or ``("timeout", None)``."""
    results: list[tuple[str, Any]] = [("timeout", None)] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = ("ok", call())
        except Exception as err:  # an environment's bug ends its trajectory, never the run
            results[i] = ("error", f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [results[i] if not t.is_alive() else ("timeout", None) for i, t in enumerate(threads)]


def step_all(envs: list[Environment], actions: list[str], timeout_s: float) -> list[StepResult]:
    """``envs[i].step(actions[i])`` for all ``i`` at once; failures and timeouts end the trajectory.

    Environments living in worker processes (:class:`~lit_moe_rl.rollout.env_workers.RemoteEnv`) are
    stepped by their pool instead, which kills a worker that misses the deadline.
    """
    if envs and getattr(envs[0], "pool", None) is not None:
        return envs[0].pool.step_all(envs, actions, timeout_s)
    calls = [
        lambda e=env, a=action: unpack_step(e.step(a)) for env, action in zip(envs, actions, strict=True)
    ]
    out = []
    for status, value in run_concurrently(calls, timeout_s):
        if status == "ok":
            out.append(StepResult(*value))
        else:
            out.append(StepResult(error=value, timed_out=status == "timeout"))
    return out


def unpack_step(value: Any) -> tuple[Any, float, bool]:
    if not (isinstance(value, tuple) and len(value) == 3):
        raise TypeError(f"rollout.env: step() must return (observation, reward, done), got {value!r}")
    observation, reward, done = value
    return observation, float(reward), bool(done)
