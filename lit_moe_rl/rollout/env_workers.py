"""Environments in worker processes: a hung or crashing environment cannot stop the run.

The reward workers' approach (:mod:`lit_moe_rl.rewards.workers`) for ``rollout.env_isolation:
process``: ``num_workers`` long-lived processes (``python -m lit_moe_rl.rollout._env_worker``) each
host the environments of some trajectories (trajectory ``i`` on worker ``i % num_workers``) and run
their resets and steps one at a time. The parent sends a batch of calls and waits for the answers
until the deadline; a worker that has not answered every call by then (stuck, or crashed: even a
segfault or ``os._exit`` in the environment) is killed and replaced. Its pending calls time out, and
the other trajectories it hosted lose their environment: their next step reports an error, so they
end, scored and counted. Each trajectory's :class:`RemoteEnv` keeps the ``metrics()`` its worker
sent with the last answer.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from lit_moe_rl.rollout.env import Environment, StepResult

log = logging.getLogger(__name__)

__all__ = ["EnvPool", "RemoteEnv"]

START_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self, blob: bytes) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lit_moe_rl.rollout._env_worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((list(sys.path), blob))
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise ValueError(f"rollout.env: an environment worker did not start within {START_TIMEOUT_S:g} s")
        status, reason = self.conn.recv()
        if status != "ready":
            self.kill()
            raise ValueError(f"rollout.env: cannot load the environment in a worker process ({reason})")
        self.generation = 0  # bumped when the worker is replaced: its environments are gone

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()


class RemoteEnv(Environment):
    """A trajectory's handle on an environment living in an :class:`EnvPool` worker."""

    def __init__(self, pool: EnvPool, key: int) -> None:
        self.pool, self.key, self.worker = pool, key, key % pool.num_workers
        self.generation = -1
        self.stop_strings: tuple[str, ...] = ()
        self.last_metrics: dict[str, Any] = {}

    def metrics(self) -> dict[str, Any]:
        return self.last_metrics


class EnvPool:
    """``num_workers`` environment worker processes for the environment ``spec`` (picklable)."""

    def __init__(self, spec: Any, num_workers: int = 2) -> None:
        self.blob = pickle.dumps(spec)
        self.num_workers = num_workers
        self.workers: list[_Worker] = []
        self.next_key = 0

    def _start(self) -> None:
        while len(self.workers) < self.num_workers:
            self.workers.append(_Worker(self.blob))

    def reset_all(
        self, samples: list[dict[str, Any]], prompts: list[Any], timeout_s: float
    ) -> tuple[list[RemoteEnv], list[tuple[str, Any]]]:
        """One fresh environment per ``(sample, prompt)``, reset in the workers by the deadline; per
        environment ``("ok", first prompt)``, ``("error", message)`` or ``("timeout", None)``."""
        self._start()
        for worker in self.workers:
            worker.conn.send(("clear", None, None))
        envs = [RemoteEnv(self, key) for key in range(len(samples))]
        for env in envs:  # a worker replaced during the resets loses the environments it held
            env.generation = self.workers[env.worker].generation
        answers = self._call(
            envs, [("reset", (s, p)) for s, p in zip(samples, prompts, strict=True)], timeout_s
        )
        out = []
        for env, (status, value) in zip(envs, answers, strict=True):
            if status != "ok":
                out.append((status, value))
                continue
            prompt, env.stop_strings, env.last_metrics = value
            out.append(("ok", prompt))
        return envs, out

    def step_all(self, envs: list[RemoteEnv], actions: list[str], timeout_s: float) -> list[StepResult]:
        """Step every environment with its action, all workers at once, by the deadline."""
        out: list[StepResult | None] = [None] * len(envs)
        live, calls = [], []
        for i, env in enumerate(envs):
            if env.generation != self.workers[env.worker].generation:
                out[i] = StepResult(
                    error="its environment worker was replaced after another environment's failure"
                )
            else:
                live.append(i)
                calls.append(("step", actions[i]))
        answers = self._call([envs[i] for i in live], calls, timeout_s)
        for i, (status, value) in zip(live, answers, strict=True):
            if status == "ok":
                observation, reward, done, envs[i].last_metrics = value
                out[i] = StepResult(observation, reward, done)
            else:
                out[i] = StepResult(error=value or "timed out", timed_out=status == "timeout")
        return out  # type: ignore[return-value]

    def _call(
        self, envs: list[RemoteEnv], calls: list[tuple[str, Any]], timeout_s: float
    ) -> list[tuple[str, Any]]:
        """Send ``calls[i]`` to ``envs[i]``'s worker; ``[(status, value)]``; replaces workers that missed the deadline."""
        index = {env.key: i for i, env in enumerate(envs)}
        answers: list[tuple[str, Any]] = [("timeout", None)] * len(envs)
        pending: dict[int, int] = {}
        for env, (op, payload) in zip(envs, calls, strict=True):
            self.workers[env.worker].conn.send((op, env.key, payload))
            pending[env.worker] = pending.get(env.worker, 0) + 1
        deadline = time.monotonic() + timeout_s
        conns = {self.workers[w].conn: w for w in pending}
        while pending and time.monotonic() < deadline:
            for conn in wait(list(conns), timeout=max(0.0, deadline - time.monotonic())):
                worker = conns[conn]
                try:
                    key, status, value = conn.recv()
                except (EOFError, OSError):  # the worker died (a crash in the environment)
                    del conns[conn]
                    continue
                answers[index[key]] = (status, value)
                pending[worker] -= 1
                if not pending[worker]:
                    del pending[worker], conns[conn]
            if not conns:
                break
        for worker in pending:
            self._replace(worker)
        return answers

    def _replace(self, index: int) -> None:
        old = self.workers[index]
        log.warning("rollout.env: an environment worker missed the deadline or died; replacing it")
        old.kill()
        self.workers[index] = _Worker(self.blob)
        self.workers[index].generation = old.generation + 1

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            worker.kill()
        self.workers = []

    def __del__(self) -> None:
        self.close()
