"""Statistics reduced by their kind (lit_moe_rl/learner/stats.py), with hand-worked values."""

from __future__ import annotations

import pytest
import torch

from lit_moe_rl.learner.stats import Gathered, Stats
from lit_moe_rl.parallel.distributed import Collectives


def test_each_kind_over_two_micro_batches_equals_the_whole_batch():
    stats = Stats()
    # micro-batch 1: 1 token with ratio 2.0; micro-batch 2: 3 tokens with ratios 1, 1, 1 (mean 1.0)
    stats.mean("policy/ratio_mean", 2.0, 1.0, "token_mean")
    stats.mean("policy/ratio_mean", 1.0, 3.0, "token_mean")
    stats.extreme("policy/ratio_max", 2.0, "max", 1.0)
    stats.extreme("policy/ratio_max", 5.0, "max", 0.0)  # an empty micro-batch's placeholder: ignored
    stats.extreme("policy/ratio_min", 1.0, "min", 3.0)
    stats.sum("policy/loss", 0.25)
    stats.sum("policy/loss", 0.5)
    stats.gathered("rspo/gamma_p10", Gathered(torch.tensor([0.9, 1.0]), "quantile", 0.1))
    stats.gathered("rspo/gamma_p10", Gathered(torch.tensor([0.8, 0.95, 1.0]), "quantile", 0.1))
    stats.gathered("reward/std", Gathered(torch.tensor([0.0, 1.0])))
    stats.gathered("reward/std", Gathered(torch.tensor([1.0, 1.0])))
    out = stats.reduce(Collectives())
    assert out["policy/ratio_mean"] == pytest.approx(5.0 / 4)  # not (2 + 1) / 2
    assert out["policy/ratio_max"] == 2.0 and out["policy/ratio_min"] == 1.0
    assert out["policy/loss"] == pytest.approx(0.75)
    pooled = torch.tensor([0.9, 1.0, 0.8, 0.95, 1.0], dtype=torch.float64)
    assert out["rspo/gamma_p10"] == pytest.approx(float(torch.quantile(pooled, 0.1)))
    assert out["reward/std"] == pytest.approx(float(torch.tensor([0.0, 1.0, 1.0, 1.0]).std()))


def test_a_statistic_without_values_takes_its_empty_value_and_kinds_cannot_mix():
    stats = Stats()
    stats.extreme("rspo/gamma_min", 0.5, "min", 0.0)
    stats.gathered("rspo/gamma_p50", Gathered(torch.zeros(0), "quantile", 0.5, empty=1.0))
    stats.mean("policy/entropy", 3.0, 0.0, "token_mean")
    assert stats.reduce(Collectives()) == {
        "policy/entropy": 0.0,
        "rspo/gamma_min": 0.0,
        "rspo/gamma_p50": 1.0,
    }
    with pytest.raises(ValueError, match="policy/entropy: declared token_mean, then max"):
        stats.extreme("policy/entropy", 1.0, "max")
