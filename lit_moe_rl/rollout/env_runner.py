"""Run the environment steps of all paused trajectories concurrently, each under a deadline.

Every ``reset``/``step`` runs in a daemon thread of its own; the caller waits at most ``timeout_s``
for the whole set. A step that raises ends its trajectory with the error (counted, never raised); a
step still running at the deadline ends its trajectory as timed out (counted) and its thread is
abandoned: a hung environment costs a thread, never the run. (An environment that holds the GIL in
a C loop is the one case a thread cannot survive; reward workers' process isolation is the model for
that, not built here.)

The threads are reused: a thread that finished its call waits for the next one. Starting a thread per
call (and waiting for it to start) was 12% of a multi-turn rollout's time on a tiny model
(bench/multiturn.py: 16 trajectories x 4 turns, 80 threads started). A thread whose call is past its
deadline is not reused until that call returns, if ever.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lit_moe_rl.rollout.env import Environment, StepResult

__all__ = ["run_concurrently", "step_all", "unpack_step"]


class _Batch:
    """Results of one :func:`run_concurrently` call, filled by the workers until it is closed."""

    def __init__(self, size: int) -> None:
        self.results: list[tuple[str, Any]] = [("timeout", None)] * size
        self.left = size
        self.closed = False
        self.cond = threading.Condition()

    def put(self, i: int, result: tuple[str, Any]) -> None:
        with self.cond:
            if not self.closed:  # a call past the deadline stays timed out
                self.results[i] = result
                self.left -= 1
                self.cond.notify()

    def wait(self, timeout_s: float) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.left and (remaining := deadline - time.monotonic()) > 0:
                self.cond.wait(remaining)
            self.closed = True
            return list(self.results)


_idle: list[_Worker] = []  # threads waiting for a call (list.append/pop are atomic)
os.register_at_fork(after_in_child=_idle.clear)  # a forked child has none of its parent's threads


class _Worker(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="lit-moe-rl-env")
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while True:
            batch, i, call = self.inbox.get()
            try:
                result = ("ok", call())
            except Exception as err:  # an environment's bug ends its trajectory, never the run
                result = ("error", f"{type(err).__name__}: {err}")
            batch.put(i, result)
            _idle.append(self)


def run_concurrently(calls: list[Callable[[], Any]], timeout_s: float) -> list[tuple[str, Any]]:
    """``[(status, value)]`` per call: ``("ok", result)``, ``("error", message)`` or ``("timeout", None)``."""
    batch = _Batch(len(calls))
    for i, call in enumerate(calls):
        try:
            worker = _idle.pop()
        except IndexError:
            worker = _Worker()
        worker.inbox.put((batch, i, call))
    return batch.wait(timeout_s)


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
