"""Math reward with `math-verify <https://github.com/huggingface/Math-Verify>`_.

math-verify bounds its parsing and comparison time with ``signal.alarm``, which works only in the
main thread (elsewhere it raises ``ValueError``). :class:`MathReward` passes its timeouts
(``parsing_timeout`` to ``parse``, ``timeout_seconds`` to ``verify``) only when called in the
main thread. By default it runs in reward worker processes (it does not declare ``thread_safe``),
where each call is in the worker's main thread, so its own timeouts work and the batch deadline
kills a worker that is still stuck. In any other thread (``rollout.reward_isolation: thread``, or
:func:`~lit_moe_rl.rewards.base.score_batch`) it passes ``None``, which math-verify documents as "no
timeout, the caller handles it": there the batch deadline bounds the wait, but the thread keeps
running. math-verify then logs one warning that its timeout is disabled; that is expected.

math-verify is imported at the first call, not with this module: a run that scores no math (the GPU
check, Countdown) needs neither it nor its LaTeX parser (antlr4).
"""

from __future__ import annotations

import threading
from typing import Any


class MathReward:
    """``score`` when the completion's final answer equals ``sample[answer_key]``, else ``0.0``.

    Both are parsed by math-verify (LaTeX such as ``\\boxed{..}`` or ``$..$``, or plain
    expressions); equality is math-verify's (numeric, symbolic, sets, intervals, ...).

    Args:
        answer_key: the sample field holding the gold answer.
        score: reward of a correct answer.
        timeout_s: math-verify's own per-step timeout, used only in the main thread (see module doc).
    """

    def __init__(self, answer_key: str = "answer", score: float = 1.0, timeout_s: int = 5):
        self.answer_key = answer_key
        self.score = float(score)
        self.timeout_s = int(timeout_s)

    def __call__(self, completion: str, sample: dict[str, Any]) -> float:
        """Reward of ``completion`` against the gold answer in ``sample[self.answer_key]``."""
        if self.answer_key not in sample:
            raise KeyError(f"math reward: sample has no {self.answer_key!r} field")
        from math_verify import parse, verify

        timeout = self.timeout_s if threading.current_thread() is threading.main_thread() else None
        gold = _parse_gold(str(sample[self.answer_key]), timeout)
        if not gold:
            raise ValueError(f"math reward: cannot parse the gold answer {sample[self.answer_key]!r}")
        pred = parse(completion, parsing_timeout=timeout)
        return self.score if pred and verify(gold, pred, timeout_seconds=timeout) else 0.0

    def __repr__(self) -> str:
        return f"MathReward(answer_key={self.answer_key!r}, score={self.score})"


def _parse_gold(gold: str, timeout: int | None) -> list:
    """Parse a gold answer as written (``"2"``, ``"$\\frac12$"``, ``"\\boxed{2}"``), else as ``$gold$``."""
    from math_verify import parse

    return parse(gold, parsing_timeout=timeout) or parse(f"${gold}$", parsing_timeout=timeout)
