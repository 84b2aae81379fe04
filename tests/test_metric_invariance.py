"""Every logged statistic is the same however the rollout is cut: micro-batches of 1, 4 or 16 rows,
with padding trimmed or not (the learner reduces each by its kind; lit_moe_rl/learner/stats.py).

One rollout of 16 completions of the warm-started built-in model (answers of different lengths), RSPO
with two mini-batch updates: the second sees a moved policy, so ratios, clip fractions and the router
shift (γ quantiles, extremes) are not trivial. Before, ``policy/ratio_max`` was an average of
per-micro-batch maxima and ``policy/kl_loss`` was averaged twice: 0.19 / 0.048 / 0.012 for micro-batches
of 16 / 4 / 1 rows.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_fit, train_rows

ARGS = [
    "--model.pretrained=builtin:countdown-tiny-moe", "--model.config=null", "--rollout.engine.max_new_tokens=12",
    "--data.batch_size=4", "--model.algorithm=lit_moe_rl.algorithms.RSPO", "--model.mini_batches=2",
    "--model.algorithm.kl_coef=1e-3", "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
    "--model.lr=2e-4", "--trainer.limit_val_batches=0", "--data.num_val=0",
]  # fmt: skip
# The first update starts at π_ref = π, where the KL term's gradient is float rounding (~1e-7 x kl_coef).
# A weight whose policy-gradient is exactly 0 (an embedding row seen only in groups of equal reward)
# gets only that noise, and AdamW's first step turns any g with |g| >> eps = 1e-8 into ±lr: at
# kl_coef 0.1 such weights moved by a rounding-dependent ±lr, and the second update's statistics
# differed by up to 0.5% between micro-batch splits. At kl_coef 1e-3 the noise is far below eps.


def logged(path, *extra: str) -> dict[str, float]:
    (row,) = train_rows(run_fit(path, *ARGS, *extra, steps=1))
    return {k: v for k, v in row.items() if not k.startswith("perf/") and k not in ("epoch", "step")}


def test_every_metric_is_the_same_for_any_micro_batch_size_and_padding_trim(tmp_path):
    reference = logged(tmp_path / "16", "--model.micro_batch_size=16")
    moved = reference["policy/ratio_max"] > 1.0 > reference["policy/ratio_min"]  # the second update moved
    assert moved and reference["policy/clipfrac"] > 0 and reference["policy/kl_loss"] > 0
    assert {"rspo/gamma_p10", "rspo/shift_p99", "rspo/gamma_min", "reward/std"} <= reference.keys()
    for name, extra in [
        ("4", ["--model.micro_batch_size=4"]),
        ("1", ["--model.micro_batch_size=1"]),
        ("4-untrimmed", ["--model.micro_batch_size=4", "--model.trim_padding=false"]),
    ]:
        other = logged(tmp_path / name, *extra)
        assert other.keys() == reference.keys(), name
        for key, value in reference.items():
            assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{name}: {key}"
