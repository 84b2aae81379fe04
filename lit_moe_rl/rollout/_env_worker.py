"""Entry point of an environment worker process (``python -m lit_moe_rl.rollout._env_worker FD``).

Protocol on the inherited socket ``FD`` (multiprocessing ``Connection`` framing): receive the parent's
``sys.path`` and the pickled environment spec, answer ``("ready", None)`` or ``("error", reason)``;
then for each ``(op, key, payload)`` answer ``(key, "ok", value)`` or ``(key, "error", reason)``:

* ``("reset", key, (sample, prompt))``: build an environment, keep it under ``key``, reset it;
  value ``(first prompt, stop strings, metrics)``;
* ``("step", key, action)``: value ``(observation, reward, done, metrics)``;
* ``("clear", None, None)``: forget every environment (no answer). ``None`` ends the loop.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from multiprocessing.connection import Connection
from typing import Any


def _metrics(env: Any) -> dict[str, Any]:
    return env.metrics() if callable(getattr(env, "metrics", None)) else {}


def _handle(envs: dict[Any, Any], make: Any, op: str, key: Any, payload: Any) -> Any:
    if op == "reset":
        env = envs[key] = make()
        return env.reset(*payload), tuple(getattr(env, "stop_strings", ()) or ()), _metrics(env)
    from lit_moe_rl.rollout.env_runner import unpack_step

    env = envs[key]
    return (*unpack_step(env.step(payload)), _metrics(env))


def serve(conn: Connection) -> None:
    """Load the environment spec, then run resets and steps until told to stop or the parent goes away."""
    path, blob = conn.recv()
    sys.path[:] = path
    try:
        from lit_moe_rl.rollout.env import env_factory

        make = env_factory(pickle.loads(blob))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    envs: dict[Any, Any] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        op, key, payload = task
        if op == "clear":
            envs.clear()
            continue
        try:
            conn.send((key, "ok", _handle(envs, make, op, key, payload)))
        except Exception as e:  # the environment's bug is its trajectory's end, never the worker's
            conn.send((key, "error", f"{type(e).__name__}: {e}"))


if __name__ == "__main__":
    from lit_moe_rl.rewards._worker import _die_with_parent

    _die_with_parent()
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        serve(Connection(int(sys.argv[1])))
