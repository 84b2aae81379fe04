"""The reward-function contract and a fault-tolerant batch scorer.

A reward function is any callable ``fn(completion, sample) -> float``: ``completion`` is the
model's response text only (the prompt is not prepended) and ``sample`` is the prompt row's
fields (``prompt``, ``numbers``, ``target``, ``answer``, ... whatever the data source carries).
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import threading
import time
from typing import Any, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)


@runtime_checkable
class RewardFn(Protocol):
    """Scores one completion: ``fn(completion, sample) -> float``."""

    def __call__(self, completion: str, sample: dict[str, Any]) -> float:
        """Reward of ``completion`` (the response text only) for the prompt row ``sample``."""
        ...


def score_batch(
    fn: RewardFn,
    completions: list[str],
    samples: list[dict[str, Any]],
    *,
    timeout_s: float = 5.0,
    num_workers: int = 4,
) -> tuple[torch.Tensor, int]:
    """Score ``completions[i]`` against ``samples[i]`` with ``fn`` in daemon threads.

    Never raises because of ``fn``: a call that raises, returns something other than a finite
    real number, or is not finished by the deadline scores ``0.0`` and counts as one error. The
    first failure of the batch is logged at WARNING with its sample index.

    Timeout semantics: one deadline for the whole batch, ``start + timeout_s``, so the call returns
    within about ``timeout_s`` whatever ``fn`` does. A thread still running at the deadline cannot be
    killed: it is abandoned (its result is discarded; it is a daemon thread, so it never keeps the
    process alive at exit) but keeps a CPU busy until ``fn`` returns. Rewards that may not return
    belong in worker processes (:class:`~lit_moe_rl.rewards.workers.RewardScorer`), which are killed.

    Returns:
        ``(rewards, errors)``: float32 tensor ``[N]`` and the number of failed calls.
    """
    scores, failures = score_in_threads(
        fn, completions, samples, timeout_s=timeout_s, num_workers=num_workers
    )
    log_failures(failures, len(completions))
    return scores, len(failures)


def score_in_threads(
    fn: RewardFn, completions: list[str], samples: list[dict[str, Any]], *, timeout_s: float, num_workers: int
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Scores ``[N]`` and ``(index, reason)`` failures; fresh daemon threads per call (see :func:`score_batch`)."""
    if len(completions) != len(samples):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(samples)} samples")
    n = len(completions)
    results: list[tuple[float, str | None] | None] = [None] * n
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    done = threading.Semaphore(0)

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = call_one(fn, completions[i], samples[i])
            done.release()

    for _ in range(max(1, min(num_workers, n))):
        threading.Thread(target=work, name="reward", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    for _ in range(n):
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break
    while True:  # calls not started by the deadline are dropped
        try:
            todo.get_nowait()
        except queue.Empty:
            break
    late = f"no result within the batch timeout of {timeout_s:g} s"
    final = [r if r is not None else (0.0, late) for r in list(results)]
    failures = [(i, reason) for i, (_, reason) in enumerate(final) if reason is not None]
    return torch.tensor([score for score, _ in final], dtype=torch.float32), failures


def call_one(fn: RewardFn, completion: str, sample: dict[str, Any]) -> tuple[float, str | None]:
    """``(score, None)`` for a good result, ``(0.0, reason)`` when ``fn`` raises or returns a non-number."""
    try:
        value = fn(completion, sample)
    except Exception as e:  # any failure of a user function scores 0
        return 0.0, f"{type(e).__name__}: {e}"
    score = _as_score(value)
    if score is None:
        return 0.0, f"returned {_short_repr(value)}, not a finite number"
    return score, None


def log_failures(failures: list[tuple[int, str]], n: int) -> None:
    """One WARNING per batch with failures: how many, and the first one's index and reason."""
    if failures:
        index, reason = failures[0]
        log.warning(
            "reward: %d of %d calls failed (scored 0.0); first at sample %d: %s",
            len(failures),
            n,
            index,
            reason,
        )


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_score(value: Any) -> float | None:
    """``value`` as a finite float (real numbers, numpy scalars, one-element tensors), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
