"""Resident memory stays flat over a run: nothing (routes, rollouts, logged values) piles up per step."""

from __future__ import annotations

from lit_moe_rl.callbacks.memory import MemoryCallback, resident_mb
from tests.helpers import run_fit, train_rows

R3 = [
    "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
    "--trainer.callbacks.mode=R3",
]


def test_rss_after_40_steps_is_within_10_percent_of_after_10(tmp_path, monkeypatch):
    seen: list[MemoryCallback] = []
    original = MemoryCallback.__init__
    monkeypatch.setattr(MemoryCallback, "__init__", lambda self: (original(self), seen.append(self))[0])
    rows = train_rows(
        run_fit(
            tmp_path, *R3, "--model.algorithm=lit_moe_rl.algorithms.RSPO", "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=lit_moe_rl.callbacks.memory.MemoryCallback", steps=40,
        )
    )  # fmt: skip
    history = dict(seen[0].history)
    assert len(history) == 40 and rows[-1]["perf/rss_mb"] == history[40]
    assert history[40] <= 1.10 * history[10], (history[10], history[40])
    assert resident_mb() > 0
