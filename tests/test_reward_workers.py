"""Reward scoring that cannot hang: worker processes killed at the deadline, daemon threads, the stop rule."""

from __future__ import annotations

import os
import time

import pytest

from lit_moe_rl.rewards import CountdownReward
from lit_moe_rl.rewards.workers import RewardScorer

SAMPLE = {"numbers": [3, 5, 7], "target": 22}


def hang_on_x(completion: str, sample: dict) -> float:
    """Never returns for a completion containing "x"; else 1.0 when it is "3*5+7"."""
    if "x" in completion:
        time.sleep(1e6)
    return float(completion == "3*5+7")


def die_on_x(completion: str, sample: dict) -> float:
    """Kills its own process for a completion containing "x"."""
    if "x" in completion:
        os._exit(3)
    return 1.0


def test_stuck_call_scores_zero_and_its_worker_is_replaced():
    scorer = RewardScorer(hang_on_x, "process", num_workers=2)
    try:
        scorer.score(["3*5+7"], [SAMPLE], timeout_s=60)  # workers started and warm
        pids = {w.process.pid for w in scorer._workers}
        t0 = time.monotonic()
        scores, failures = scorer.score(["3*5+7", "x", "1", "3*5+7"], [SAMPLE] * 4, timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0
        assert scores.tolist() == [1.0, 0.0, 0.0, 1.0]
        assert [i for i, _ in failures] == [1] and "timeout of 1 s" in failures[0][1]
        # the stuck worker was killed; the next batch gets fresh workers, not the stuck one
        scores, failures = scorer.score(["3*5+7"] * 3, [SAMPLE] * 3, timeout_s=60)
        assert scores.tolist() == [1.0] * 3 and not failures
        assert len(scorer._workers) == 2 and {w.process.pid for w in scorer._workers} != pids
        assert all(w.process.poll() is None for w in scorer._workers)
    finally:
        scorer.close()


def test_crashed_worker_fails_its_call_only():
    scorer = RewardScorer(die_on_x, "process", num_workers=1)
    try:
        scores, failures = scorer.score(["a", "x", "b"], [SAMPLE] * 3, timeout_s=30)
        assert scores.tolist()[0] == 1.0 and [i for i, _ in failures][0] == 1
        assert "died" in failures[0][1]
        scores, failures = scorer.score(["a"], [SAMPLE], timeout_s=30)
        assert scores.tolist() == [1.0] and not failures
    finally:
        scorer.close()


def test_auto_isolation_uses_threads_only_for_declared_safe_rewards():
    assert RewardScorer(CountdownReward(), "auto").isolation == "thread"
    assert RewardScorer(hang_on_x, "auto").isolation == "process"
    assert RewardScorer(lambda c, s: 1.0, "auto").isolation == "thread"  # not picklable: threads, warned


def test_unloadable_reward_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    scorer = RewardScorer(hang_on_x, "process", num_workers=1)
    monkeypatch.setattr(scorer, "_blob", b"not a pickle")
    with pytest.raises(ValueError, match="rollout.reward: cannot load the reward in a worker process"):
        scorer.score(["a"], [SAMPLE], timeout_s=5)
    scorer.close()


@pytest.mark.parametrize(("isolation", "workers"), [("x", 1), ("thread", 0)])
def test_bad_scorer_settings(isolation, workers):
    with pytest.raises(ValueError, match="rollout.reward_"):
        RewardScorer(CountdownReward(), isolation, workers)


def test_math_reward_runs_in_a_worker_process_with_its_own_timeouts():
    from lit_moe_rl.rewards import MathReward

    scorer = RewardScorer(MathReward(), "auto", num_workers=1)
    assert scorer.isolation == "process"
    try:
        scores, failures = scorer.score(["\\boxed{2}", "\\boxed{5}"], [{"answer": "2"}] * 2, timeout_s=60)
    finally:
        scorer.close()
    assert scores.tolist() == [1.0, 0.0] and not failures
