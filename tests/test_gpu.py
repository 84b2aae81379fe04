"""GPU-only end-to-end runs (``pytest -m gpu``; skipped without CUDA): the CPU suite cannot reach the
CUDA paths of the rollout engine, the bf16 copy and routing replay. ``bench/gpu_check.py`` is the larger
check for a lent GPU; these are the short ones that belong in the suite."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_fit, train_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ON_GPU = ("--trainer.accelerator=gpu", "--trainer.devices=1")


def test_grpo_steps_on_a_gpu(tmp_path):
    rows = train_rows(run_fit(tmp_path, *ON_GPU, steps=2))
    assert len(rows) == 2 and rows[-1]["policy/skipped_steps"] == 0
    assert all(math.isfinite(r["policy/grad_norm"]) and 0.0 <= r["reward/mean"] <= 1.0 for r in rows)


def test_r3_with_a_bf16_engine_replays_every_route_on_a_gpu(tmp_path):
    """R3 (arXiv 2510.11370): with a bf16 engine beside the fp32 trainer, the trainer uses exactly the
    rollout's experts."""
    rows = train_rows(run_fit(
        tmp_path, *ON_GPU, "--rollout.engine.dtype=bfloat16",
        "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback", steps=2,
    ))  # fmt: skip
    assert rows[-1]["policy/skipped_steps"] == 0
    assert all(r["routing/rollout_train_router_disagreement"] == 0.0 for r in rows)
