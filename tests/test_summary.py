"""The run summary gives the log folder, skipped updates, failed reward calls and, for R3/RSPO, routing."""

from __future__ import annotations

import logging

from tests.helpers import run_fit


def _summary(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "run summary" in r.getMessage())


def test_summary_of_an_r3_run_has_routing_numbers_and_the_log_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    metrics = run_fit(
        tmp_path,
        "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
        "--trainer.callbacks.mode=R3",
    )
    text = _summary(caplog)
    assert "skipped updates: 0" in text
    assert "failed reward calls: 0 of 24 (scored 0)" in text  # 8 validation + 2 steps x 8 completions
    assert "routing/rollout_train_router_disagreement 0 " in text + " "  # replay happened: 0 by construction
    assert "mismatch/train_infer_kl" in text
    assert f"logs: {metrics.parent}" in text


def test_summary_counts_failed_reward_calls_and_has_no_routing_line_without_r3(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_fit(
        tmp_path,
        "--rollout.reward=tests.test_summary:fail_half",
        "--rollout.reward_isolation=thread",
        "--rollout.reward_workers=1",  # one thread: the call counter below is exact
    )
    text = _summary(caplog)
    assert "failed reward calls: 12 of 24 (scored 0)" in text
    assert "routing (run mean)" not in text


def fail_half(completion: str, sample: dict) -> float:
    """Raises on every other call (odd-numbered calls)."""
    fail_half.calls = getattr(fail_half, "calls", 0) + 1
    if fail_half.calls % 2:
        raise RuntimeError("flaky verifier")
    return 1.0
