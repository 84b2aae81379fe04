import math

import pytest
import torch

from lit_moe_rl.corrections import (
    CORRECTIONS,
    apply_correction,
    geo_rejection,
    icepop,
    no_correction,
    seq_tis,
    token_rejection,
    token_tis,
)


def _logps(rhos, requires_grad=False):
    """old_logp = log rho, infer_logp = 0, so log rho is exactly float32(log rho)."""
    old = torch.tensor([[math.log(r) if r > 0 else -math.inf for r in row] for row in rhos])
    old.requires_grad_(requires_grad)
    return old, torch.zeros(old.shape)


def _approx(t, values):
    return torch.allclose(t, torch.tensor(values, dtype=t.dtype), atol=1e-6)


def test_token_tis_caps_ratio_strictly_above_cap():
    old, infer = _logps([[0.5, 1.0, 2.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    w, stats = token_tis(old, infer, mask, cap=2.0)
    # min(rho, 2) = 0.5, 1, 2, 2; only rho=4 is truncated (rho=2 sits exactly at the cap).
    assert _approx(w, [[0.5, 1.0, 2.0, 2.0]])
    assert stats["clipped_frac"].item() == pytest.approx(0.25)
    assert stats["is_weight_mean"].item() == pytest.approx(5.5 / 4)
    assert stats["masked_frac"].item() == 0.0


def test_token_tis_masked_garbage_does_not_leak():
    old, infer = _logps([[0.5, 1.0, 2.0, 4.0]])
    old = old.clone()
    old[0, 3] = float("nan")
    mask = torch.tensor([[True, True, True, False]])
    w, stats = token_tis(old, infer, mask)
    # valid weights 0.5, 1, 2 (no truncation); the nan position is 0.
    assert _approx(w, [[0.5, 1.0, 2.0, 0.0]])
    assert stats["is_weight_mean"].item() == pytest.approx(3.5 / 3)
    assert stats["clipped_frac"].item() == 0.0


def test_seq_tis_product_and_cap():
    # seq0: 2 * 0.5 * 1.5 = 1.5 -> 1.5; seq1: 2 * 2 * (masked inf) -> 4 -> capped at 2.
    old, infer = _logps([[2.0, 0.5, 1.5], [2.0, 2.0, 1.0]])
    old = old.clone()
    old[1, 2] = float("inf")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w, stats = seq_tis(old, infer, mask, cap=2.0)
    assert _approx(w, [[1.5, 1.5, 1.5], [2.0, 2.0, 0.0]])
    # 2 of the 5 valid tokens belong to the truncated sequence.
    assert stats["clipped_frac"].item() == pytest.approx(2 / 5)
    assert stats["is_weight_mean"].item() == pytest.approx((4.5 + 4.0) / 5)


def test_icepop_band_inclusive():
    old, infer = _logps([[0.4, 0.5, 1.0, 5.0, 6.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    w, stats = icepop(old, infer, mask, alpha=0.5, beta=5.0)
    # M(rho) = rho inside [0.5, 5] (bounds inclusive), else 0.
    assert _approx(w, [[0.0, 0.5, 1.0, 5.0, 0.0]])
    assert stats["masked_frac"].item() == pytest.approx(2 / 5)
    assert stats["is_weight_mean"].item() == pytest.approx(6.5 / 5)
    assert stats["clipped_frac"].item() == 0.0


def test_token_rejection_is_a_mask_not_a_ratio():
    old, infer = _logps([[0.49, 0.5, 1.3, 2.0, 2.01]])
    mask = torch.tensor([[True, True, True, True, True]])
    w, stats = token_rejection(old, infer, mask, low=0.5, high=2.0)
    # 1 inside [0.5, 2] (not rho: the 1.3 token gets weight 1), 0 outside.
    assert _approx(w, [[0.0, 1.0, 1.0, 1.0, 0.0]])
    assert stats["masked_frac"].item() == pytest.approx(2 / 5)


def test_geo_rejection_per_sequence():
    # seq0: geo-mean sqrt(2 * 0.5) = 1 -> accepted; seq1: sqrt(1.5 * 1) = 1.2247 -> rejected.
    # seq2: second token masked (garbage nan); geo-mean over the valid token = 1.0 -> accepted.
    old, infer = _logps([[2.0, 0.5], [1.5, 1.0], [1.0, 1.0]])
    old = old.clone()
    old[2, 1] = float("nan")
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    w, stats = geo_rejection(old, infer, mask, low=0.9, high=1.1)
    assert _approx(w, [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert stats["masked_frac"].item() == pytest.approx(2 / 5)
    assert stats["is_weight_mean"].item() == pytest.approx(3 / 5)


def test_geo_rejection_default_bounds():
    # mean log rho 0.0005 -> exp = 1.0005 in [0.999, 1.001]; 0.002 -> 1.002 is outside.
    old = torch.tensor([[0.0005, 0.0005], [0.002, 0.002]])
    w, _ = geo_rejection(old, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert _approx(w, [[1.0, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize("kind", list(CORRECTIONS))
def test_outputs_detached_and_zero_when_masked(kind):
    old, infer = _logps([[0.3, 1.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    w, stats = apply_correction(kind, old, infer, mask)
    assert not w.requires_grad and w.dtype == torch.float32
    assert w[0, 2] == 0.0
    assert set(stats) == {"is_weight_mean", "clipped_frac", "masked_frac"}
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


@pytest.mark.parametrize("kind", list(CORRECTIONS))
def test_empty_mask_gives_zeros(kind):
    old, infer = _logps([[1.0, 2.0]])
    w, stats = apply_correction(kind, old, infer, torch.zeros(1, 2, dtype=torch.bool))
    assert torch.equal(w, torch.zeros(1, 2))
    assert all(v.item() == 0.0 for v in stats.values())


def test_none_and_dispatch():
    mask = torch.tensor([[True, False]])
    w, stats = no_correction(None, None, mask)
    assert torch.equal(w, torch.tensor([[1.0, 0.0]]))
    assert stats["is_weight_mean"].item() == 1.0
    old, infer = _logps([[4.0, 1.0]])
    w_direct, _ = token_tis(old, infer, mask, cap=3.0)
    w_dispatch, _ = apply_correction("token_tis", old, infer, mask, cap=3.0)
    assert torch.equal(w_direct, w_dispatch)
    assert w_dispatch[0, 0].item() == pytest.approx(3.0)


def test_errors():
    old, infer = _logps([[1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unknown 'x'; choose one of none, token_tis"):
        apply_correction("x", old, infer, mask)
    with pytest.raises(ValueError, match="cap"):
        token_tis(old, infer, mask, cap=0.0)
    with pytest.raises(ValueError, match="cap"):
        seq_tis(old, infer, mask, cap=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        icepop(old, infer, mask, alpha=5.0, beta=0.5)
    with pytest.raises(ValueError, match="low"):
        token_rejection(old, infer, mask, low=2.0, high=1.0)
    with pytest.raises(ValueError, match="low"):
        geo_rejection(old, infer, mask, low=1.0, high=1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        token_tis(old, torch.zeros(1, 2), mask)
