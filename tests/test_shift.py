import math

import pytest
import torch

from lit_moe_rl.routing.shift import (
    RouterShift,
    router_shift,
    router_shift_ratio,
    shift_stats,
    topk_set_changed,
)


def _hand_example():
    # B=1, T=1, L=2, K=2: |diff| layer0 = 0.1, 0.3 -> d0 = 0.2; layer1 = 0.2, 0.0 -> d1 = 0.1.
    old = torch.full((1, 1, 2, 2), -2.0)
    new = old + torch.tensor([[[[0.1, -0.3], [0.2, 0.0]]]])
    return new, old


def test_gamma_is_one_when_unchanged():
    x = torch.randn(2, 3, 4, 2)
    shift = router_shift(x, x.clone())
    assert torch.equal(shift.gamma, torch.ones(2, 3))
    assert torch.equal(shift.gamma_raw, torch.ones(2, 3))
    assert torch.equal(shift.delta, torch.zeros(2, 3))


def test_hand_example_mean():
    new, old = _hand_example()
    gamma, d_layer = router_shift_ratio(new, old, return_layer_shift=True)
    assert torch.allclose(d_layer, torch.tensor([[[0.2, 0.1]]]), atol=1e-6)
    # Delta = 0.15, gamma = exp(-0.15) = 0.8607 > 0.8: the floor does not bind.
    assert gamma.item() == pytest.approx(math.exp(-0.15), rel=1e-6)


def test_layer_reduce_sum():
    new, old = _hand_example()
    # Delta = 0.2 + 0.1 = 0.3, gamma = exp(-0.3) = 0.7408: floored to 0.8, or kept with floor=0.
    shift = router_shift(new, old, layer_reduce="sum")
    assert shift.delta.item() == pytest.approx(0.3, rel=1e-6)
    assert shift.gamma_raw.item() == pytest.approx(math.exp(-0.3), rel=1e-6)
    assert shift.gamma.item() == pytest.approx(0.8)
    assert router_shift_ratio(new, old, floor=0.0, layer_reduce="sum").item() == pytest.approx(math.exp(-0.3))


def test_floor_binds_and_is_counted():
    # one layer, K=1, |diff| = log 2 -> raw gamma 0.5 -> floored to 0.8.
    old = torch.zeros(1, 2, 1, 1)
    new = torch.tensor([[[[math.log(2.0)]], [[0.0]]]]).view(1, 2, 1, 1)
    shift = router_shift(new, old, floor=0.8)
    assert shift.gamma_raw[0, 0].item() == pytest.approx(0.5)
    assert torch.allclose(shift.gamma, torch.tensor([[0.8, 1.0]]))
    stats = shift_stats(shift, None, floor=0.8)
    assert stats["floor_frac"].item() == pytest.approx(0.5)
    assert stats["gamma_min"].item() == pytest.approx(0.8)


def test_no_gradient_and_masked_positions_neutral():
    old = torch.zeros(1, 3, 2, 2)
    new = torch.full((1, 3, 2, 2), 0.5, requires_grad=True)
    garbage = new.detach().clone()
    garbage[0, 2] = float("nan")
    garbage.requires_grad_(True)
    mask = torch.tensor([[True, False, False]])
    shift = router_shift(garbage, old, mask)
    assert not any(t.requires_grad for t in shift)
    assert torch.allclose(shift.gamma, torch.tensor([[0.8, 1.0, 1.0]]))  # raw exp(-0.5)=0.607 floored
    assert torch.equal(shift.layer_shift[0, 1:], torch.zeros(2, 2))
    assert not router_shift_ratio(new, old).requires_grad


def test_shift_stats_by_hand():
    # T=6, L=K=1: Delta = 0, 0.1, 0.2, 0.3, 0.4 and a masked token with garbage nan.
    deltas = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, float("nan")])
    new = deltas.view(1, 6, 1, 1)
    old = torch.zeros(1, 6, 1, 1)
    mask = torch.tensor([[True] * 5 + [False]])
    stats = shift_stats(router_shift(new, old, mask, floor=0.8), mask, floor=0.8)
    # floored gamma = 1, e^-0.1 = 0.904837, e^-0.2 = 0.818731, 0.8 (raw 0.7408), 0.8 (raw 0.6703)
    assert stats["gamma_mean"].item() == pytest.approx((1 + 0.904837 + 0.818731 + 0.8 + 0.8) / 5, rel=1e-5)
    # p10: position 0.1 * 4 = 0.4 between the two lowest values, both 0.8 -> 0.8
    assert stats["gamma_p10"].item() == pytest.approx(0.8)
    assert stats["gamma_p50"].item() == pytest.approx(0.818731, rel=1e-5)
    assert stats["gamma_min"].item() == pytest.approx(0.8)
    assert stats["floor_frac"].item() == pytest.approx(2 / 5)  # raw gamma < 0.8 iff Delta > 0.2231
    # p90 of Delta: position 0.9 * 4 = 3.6 -> 0.3 + 0.6 * 0.1 = 0.36
    assert stats["shift_p90"].item() == pytest.approx(0.36, rel=1e-5)
    assert stats["shift_mean"].item() == pytest.approx(0.2, rel=1e-5)
    assert torch.allclose(stats["layer_shift"], torch.tensor([0.2]))


def test_shift_stats_layer_and_empty():
    new, old = _hand_example()
    stats = shift_stats(router_shift(new, old), torch.ones(1, 1, dtype=torch.bool), floor=0.8)
    assert torch.allclose(stats["layer_shift"], torch.tensor([0.2, 0.1]))
    empty = shift_stats(router_shift(new, old), torch.zeros(1, 1, dtype=torch.bool), floor=0.8)
    assert empty["gamma_mean"].item() == 1.0 and empty["gamma_p10"].item() == 1.0
    assert empty["floor_frac"].item() == 0.0 and empty["shift_p90"].item() == 0.0
    assert torch.equal(empty["layer_shift"], torch.zeros(2))
    assert isinstance(router_shift(new, old), RouterShift)


def test_errors():
    new, old = _hand_example()
    with pytest.raises(ValueError, match="floor"):
        router_shift(new, old, floor=1.5)
    with pytest.raises(ValueError, match="floor"):
        router_shift(new, old, floor=-0.1)
    with pytest.raises(ValueError, match="layer_reduce"):
        router_shift(new, old, layer_reduce="max")
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\) and \(1, 1, 2, 1\)"):
        router_shift(new, old[..., :1])
    with pytest.raises(ValueError, match="mask"):
        router_shift(new, old, torch.ones(1, 2, dtype=torch.bool))


def test_topk_set_changed():
    old_ids = torch.tensor([[[[1, 2], [3, 4]], [[0, 1], [2, 3]], [[-1, -1], [-1, -1]]]])
    new_ids = torch.tensor([[[[2, 1], [3, 4]], [[0, 5], [3, 2]], [[5, 6], [7, 0]]]])
    out = topk_set_changed(old_ids, new_ids)
    assert out["topk_changed_router_frac"].item() == pytest.approx(0.25)
    assert out["topk_changed_token_frac"].item() == pytest.approx(0.5)
