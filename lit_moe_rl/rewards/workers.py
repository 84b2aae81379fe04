"""Reward scoring that a stuck reward cannot hang: worker processes killed at the batch deadline.

A reward function runs in one of two ways (``rollout.reward_isolation``):

- ``process``: in ``num_workers`` long-lived worker processes (``python -m``), one call at a time
  each. A call still running at the batch deadline scores ``0.0`` and its worker is killed and
  replaced, so neither the run's exit nor the next step's scoring waits for it. Cost: the function
  and each ``(completion, sample)`` are pickled (measured in docs/data_and_rewards.md).
- ``thread``: in daemon threads (:func:`~lit_moe_rl.rewards.base.score_in_threads`); cheaper, but a
  stuck call keeps a CPU busy until it returns. Only for rewards that bound their own work.

``auto`` (the default) picks ``thread`` for a reward with ``thread_safe = True`` (the built-in
Countdown reward: pure Python with bounded work) and ``process`` for every other reward.
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
from typing import Any, Literal

import torch

from lit_moe_rl.rewards.base import RewardFn, log_failures, score_in_threads

log = logging.getLogger(__name__)
Isolation = Literal["auto", "process", "thread"]


START_TIMEOUT_S = 120.0
"""How long a worker may take to start and import the reward before the run stops."""


class _Worker:
    """One worker process (``python -m lit_moe_rl.rewards._worker``) and the parent's end of its socket."""

    def __init__(self, blob: bytes) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lit_moe_rl.rewards._worker", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((list(sys.path), blob))
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the worker has loaded the reward; a one-line ValueError if it cannot."""
        if self.ready:
            return
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise EOFError(f"not ready after {START_TIMEOUT_S:g} s")
            status, reason = self.conn.recv()
        except (EOFError, OSError) as e:
            status, reason = "error", f"the worker process exited ({e or 'no answer'})"
        if status != "ready":
            self.kill()
            raise ValueError(
                f"rollout.reward: cannot load the reward in a worker process ({reason}); "
                "make it importable, or set rollout.reward_isolation=thread"
            )
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()


class RewardScorer:
    """Scores batches with a reward function, isolated as ``isolation`` says (see the module docstring).

    Args:
        fn: the reward ``fn(completion, sample) -> float``.
        isolation: ``auto``, ``process`` or ``thread``.
        num_workers: worker processes (or threads), >= 1.
    """

    def __init__(self, fn: RewardFn, isolation: Isolation = "auto", num_workers: int = 2) -> None:
        if isolation not in ("auto", "process", "thread"):
            raise ValueError(f"rollout.reward_isolation: expected auto, process or thread, got {isolation!r}")
        if num_workers < 1:
            raise ValueError(f"rollout.reward_workers: must be >= 1, got {num_workers}")
        self.fn = fn
        self.num_workers = num_workers
        if isolation == "auto":
            isolation = "thread" if getattr(fn, "thread_safe", False) else "process"
        if isolation == "process" and not picklable(fn):
            log.warning("reward: %r cannot be pickled for worker processes; scoring in threads", fn)
            isolation = "thread"
        self.isolation = isolation
        self._workers: list[_Worker] = []
        self._blob = pickle.dumps(fn) if self.isolation == "process" else b""

    def score(
        self, completions: list[str], samples: list[dict[str, Any]], timeout_s: float
    ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """Rewards ``[N]`` float32 and the ``(index, reason)`` of each failed call; returns by the deadline."""
        if len(completions) != len(samples):
            raise ValueError(f"reward: {len(completions)} completions but {len(samples)} samples")
        if self.isolation == "thread":
            scores, failures = score_in_threads(
                self.fn, completions, samples, timeout_s=timeout_s, num_workers=self.num_workers
            )
        else:
            scores, failures = self._score_in_processes(completions, samples, timeout_s)
        log_failures(failures, len(completions))
        return scores, failures

    def _score_in_processes(
        self, completions: list[str], samples: list[dict[str, Any]], timeout_s: float
    ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        self._start()
        n = len(completions)
        results: dict[int, tuple[float, str | None]] = {}
        pending = list(range(n - 1, -1, -1))
        idle = list(self._workers)
        busy: dict[Connection, tuple[_Worker, int]] = {}
        deadline = time.monotonic() + timeout_s
        while pending or busy:
            while pending and idle:
                worker, i = idle.pop(), pending.pop()
                worker.conn.send((i, completions[i], samples[i]))
                busy[worker.conn] = (worker, i)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not busy:  # past the deadline, or every worker crashed
                break
            for conn in wait(list(busy), timeout=remaining):
                worker, i = busy.pop(conn)
                try:
                    _, score, reason = conn.recv()
                except (EOFError, OSError):  # it crashed: replaced at the next batch, not mid-batch
                    results[i] = (0.0, "the reward's worker process died")
                    self._drop(worker)
                    continue
                results[i] = (score, reason)
                idle.append(worker)
        late = f"no result within the batch timeout of {timeout_s:g} s (worker killed)"
        for worker, i in busy.values():
            results[i] = (0.0, late)
            self._drop(worker)
        self._start(wait=False)  # replacements boot while the step goes on
        final = [
            results.get(i, (0.0, f"not started within the batch timeout of {timeout_s:g} s"))
            for i in range(n)
        ]
        failures = [(i, reason) for i, (_, reason) in enumerate(final) if reason is not None]
        return torch.tensor([s for s, _ in final], dtype=torch.float32), failures

    def _start(self, wait: bool = True) -> None:
        """Start workers up to ``num_workers``; with ``wait``, until each has loaded the reward."""
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._blob))
        if wait:
            for worker in self._workers:
                worker.wait_ready()

    def _drop(self, worker: _Worker) -> None:
        """Kill ``worker`` (stuck or crashed) and forget it."""
        worker.kill()
        self._workers.remove(worker)

    def close(self) -> None:
        """Stop every worker process (killed: a worker may be stuck in a call)."""
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_workers": []}

    def __deepcopy__(self, memo: dict) -> RewardScorer:
        return RewardScorer(self.fn, self.isolation, self.num_workers)


def picklable(fn: Any) -> bool:
    try:
        pickle.dumps(fn)
    except Exception:
        return False
    return True
