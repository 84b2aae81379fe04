import math

import pytest
import torch

import lit_moe_rl.metrics as metrics
from lit_moe_rl.metrics import (
    expert_load_entropy,
    extreme_token_fraction,
    logp_diff_stats,
    routing_agreement,
    train_infer_kl,
)


def test_train_infer_kl_by_hand():
    # r = 2, 1, 0.5 (+ a masked nan):
    #   2 - 1 - log 2 = 0.306853;  1 - 1 - 0 = 0;  0.5 - 1 + log 2 = 0.193147;  sum = 0.5, mean = 1/6.
    train = torch.tensor([[math.log(2.0), 0.0, math.log(0.5), float("nan")]])
    infer = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    kl = train_infer_kl(train, infer, mask)
    assert kl.dim() == 0
    assert kl.item() == pytest.approx(0.5 / 3, rel=1e-5)


def test_train_infer_kl_clamps_and_empty():
    train = torch.tensor([[50.0]])
    kl = train_infer_kl(train, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    # log r clamped to 20: e^20 - 1 - 20.
    assert kl.item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert train_infer_kl(train, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0


def test_extreme_token_fraction_strict_at_tau():
    # r = 2, 0.5 (exactly at tau: not extreme), 1/3, 3 (extreme), 1; masked garbage inf.
    train = torch.tensor([[math.log(2.0), math.log(0.5), 0.0, math.log(3.0), 0.0, float("inf")]])
    infer = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    assert extreme_token_fraction(train, infer, mask, tau=2.0).item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="tau"):
        extreme_token_fraction(train, infer, mask, tau=1.0)


def test_logp_diff_stats():
    train = torch.tensor([[0.1, -0.3, 0.2, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    stats = logp_diff_stats(train, torch.zeros(1, 4), mask)
    assert stats["logp_absdiff_mean"].item() == pytest.approx(0.2)
    assert stats["logp_absdiff_max"].item() == pytest.approx(0.3)


def _routes():
    # [1, 3, 2, 2]: token0 equal sets (layer0 order-permuted); token1 layer0 {0,1} vs {0,5} (overlap 1),
    # layer1 {2,3} vs {3,2} (equal); token2 has -1 on side a -> excluded.
    a = torch.tensor([[[[1, 2], [3, 4]], [[0, 1], [2, 3]], [[-1, -1], [-1, -1]]]], dtype=torch.int8)
    b = torch.tensor([[[[2, 1], [3, 4]], [[0, 5], [3, 2]], [[5, 6], [7, 0]]]], dtype=torch.int32)
    return a, b


def test_routing_agreement_by_hand():
    a, b = _routes()
    out = routing_agreement(a, b)
    # 2 tokens x 2 layers compared; only (token1, layer0) differs.
    assert out["tokens"].item() == 2
    assert out["router_disagreement"].item() == pytest.approx(1 / 4)
    assert out["token_disagreement"].item() == pytest.approx(1 / 2)
    assert out["routers_differing_per_token"].item() == pytest.approx(1 / 2)
    # layer0 overlaps 2/2 and 1/2 -> 0.75; layer1 2/2 and 2/2 -> 1.0; mean 0.875.
    assert out["overlap_at_k/0"].item() == pytest.approx(0.75)
    assert out["overlap_at_k/1"].item() == pytest.approx(1.0)
    assert out["overlap_at_k"].item() == pytest.approx(0.875)


def test_routing_agreement_valid_chunks_and_empty(monkeypatch):
    a, b = _routes()
    only_token1 = routing_agreement(a, b, valid=torch.tensor([[False, True, True]]))
    assert only_token1["tokens"].item() == 1
    assert only_token1["router_disagreement"].item() == pytest.approx(0.5)
    assert only_token1["token_disagreement"].item() == pytest.approx(1.0)
    assert only_token1["overlap_at_k/0"].item() == pytest.approx(0.5)
    monkeypatch.setattr(metrics, "_CHUNK_TOKENS", 1)
    chunked = routing_agreement(a, b)
    assert chunked["router_disagreement"].item() == pytest.approx(1 / 4)
    assert chunked["overlap_at_k"].item() == pytest.approx(0.875)
    empty = routing_agreement(a, b, valid=torch.zeros(1, 3, dtype=torch.bool))
    assert empty["tokens"].item() == 0
    assert all(v.item() == 0.0 for v in empty.values())
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 2\) and \(1, 3, 2, 1\)"):
        routing_agreement(a, b[..., :1])


def test_expert_load_entropy():
    # layer0: experts 0,1,2,3 once each -> uniform -> 1.0
    # layer1: always expert 0 (second slot -1, ignored) -> 0.0
    # layer2: experts 0,1 twice each of 4 -> log 2 / log 4 = 0.5
    routes = torch.tensor([[[[0, 1], [0, -1], [0, 1]], [[2, 3], [0, -1], [1, 0]]]])
    ent = expert_load_entropy(routes, num_experts=4)
    assert ent.shape == (3,)
    assert torch.allclose(ent, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6)
    # valid drops token1 -> layer0 sees {0, 1} only -> 0.5
    ent_valid = expert_load_entropy(routes, 4, valid=torch.tensor([[True, False]]))
    assert ent_valid[0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_experts"):
        expert_load_entropy(routes, num_experts=1)
    with pytest.raises(ValueError, match="num_experts"):
        expert_load_entropy(routes, num_experts=3)
