"""The reward-function contract and a fault-tolerant batch scorer.

A reward function is any callable ``fn(completion, sample) -> float``: ``completion`` is the
model's response text only (the prompt is not prepended) and ``sample`` is the prompt row's
fields (``prompt``, ``numbers``, ``target``, ``answer``, ... whatever the data source carries).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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
    """Score ``completions[i]`` against ``samples[i]`` with ``fn`` in a thread pool.

    Never raises because of ``fn``: a call that raises, returns something other than a finite
    real number, or is not finished by the deadline scores ``0.0`` and counts as one error. The
    first failure of the batch is logged at WARNING with its sample index.

    Timeout semantics: one deadline for the whole batch, ``start + timeout_s``; every future is
    waited on until that deadline, so the call returns within about ``timeout_s`` whatever ``fn``
    does. Calls still queued at the deadline are cancelled (and count as errors). A thread that is
    still running cannot be killed: it is abandoned (``shutdown(wait=False, cancel_futures=True)``)
    and its result discarded, but it keeps a CPU busy until ``fn`` returns, and the interpreter
    waits for it at exit. Reward functions should therefore bound their own work (as
    :func:`~lit_moe_rl.rewards.arith.safe_eval` does).

    Returns:
        ``(rewards, errors)``: float32 tensor ``[N]`` and the number of failed calls.
    """
    if len(completions) != len(samples):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(samples)} samples")
    n = len(completions)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32), 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(num_workers, n)), thread_name_prefix="reward")
    try:
        futures = [pool.submit(fn, c, s) for c, s in zip(completions, samples, strict=True)]
        scores, failures = _collect(futures, deadline=time.monotonic() + timeout_s, timeout_s=timeout_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if failures:
        index, reason = failures[0]
        log.warning(
            "reward: %d of %d calls failed (scored 0.0); first at sample %d: %s",
            len(failures),
            n,
            index,
            reason,
        )
    return torch.tensor(scores, dtype=torch.float32), len(failures)


def _collect(
    futures: list[Future], *, deadline: float, timeout_s: float
) -> tuple[list[float], list[tuple[int, str]]]:
    """Wait on each future until ``deadline``; returns the scores and ``(index, reason)`` failures."""
    scores: list[float] = []
    failures: list[tuple[int, str]] = []
    for i, fut in enumerate(futures):
        score, reason = _result(fut, deadline=deadline, timeout_s=timeout_s)
        scores.append(score)
        if reason is not None:
            failures.append((i, reason))
    return scores, failures


def _result(fut: Future, *, deadline: float, timeout_s: float) -> tuple[float, str | None]:
    """``(score, None)`` for a good result, ``(0.0, reason)`` for a failure or a missed deadline."""
    try:
        value = fut.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return 0.0, f"no result within the batch timeout of {timeout_s:g} s"
    except Exception as e:  # any failure of a user function scores 0
        return 0.0, f"{type(e).__name__}: {e}"
    score = _as_score(value)
    if score is None:
        return 0.0, f"returned {_short_repr(value)}, not a finite number"
    return score, None


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
