"""Hand-worked checks of lit_moe_rl.losses (values, gradients, masking, micro-batch invariance)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moe_rl.losses import (
    AGG_MODES,
    aggregate,
    gmpo_loss,
    grpo_loss,
    gspo_loss,
    kl_estimate,
    masked_mean,
    masked_sum,
)

NAN, INF = float("nan"), float("inf")


def leaf(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, atol=atol, rtol=1e-7)


def random_batch(seed: int = 0, b: int = 6, t: int = 5):
    """Random logp/old_logp/advantages with uneven lengths (row 3 empty) and garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 0, 4, 2])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T]
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5
    old_logp = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    logp = torch.where(mask, logp, torch.full_like(logp, NAN))
    old_logp = torch.where(mask, old_logp, torch.full_like(old_logp, INF))
    return logp.requires_grad_(), old_logp, adv, mask


# ----------------------------------------------------------------------------- helpers / aggregate


def test_masked_helpers_ignore_garbage():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.float32)  # 0/1 float mask works too
    close(masked_sum(x, m), 13.0)
    close(masked_mean(x, m), 13.0 / 4)
    close(masked_mean(x, m, dim=-1), [1.5, 5.0])
    close(masked_mean(x, torch.zeros(2, 3, dtype=torch.bool)), 0.0)  # empty mask -> 0, not nan


def test_aggregate_modes_by_hand():
    # L = [[1, 2, 3], [4, 5, nan(masked)]], lengths 3 and 2, T = 3, 5 tokens, 2 sequences
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    close(aggregate(loss, mask, "token-mean"), 15.0 / 5)
    close(aggregate(loss, mask, "seq-mean-token-mean"), (6.0 / 3 + 9.0 / 2) / 2)  # (2 + 4.5) / 2
    close(aggregate(loss, mask, "seq-mean-token-sum"), 15.0 / 2)
    close(aggregate(loss, mask, "seq-mean-token-sum-norm"), 15.0 / (3 * 2))  # norm_const = T = 3
    close(aggregate(loss, mask, "seq-mean-token-sum-norm", norm_const=10), 15.0 / (10 * 2))
    close(aggregate(loss, mask, "token-mean", num_tokens=10), 1.5)
    close(aggregate(loss, mask, "seq-mean-token-sum", num_seqs=5), 3.0)


def test_aggregate_empty_rows_do_not_count_as_sequences():
    loss = torch.tensor([[2.0, 2.0], [7.0, 7.0]])
    mask = torch.tensor([[True, False], [False, False]])
    for agg in AGG_MODES[:3]:
        close(aggregate(loss, mask, agg), 2.0)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match=r"loss_agg_mode: unknown 'mean'; choose one of token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_microbatch_sum_equals_full_batch(agg):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 5, generator=g, dtype=torch.float64)
    _, _, _, mask = random_batch()
    counts = {"num_tokens": mask.sum(), "num_seqs": (mask.sum(-1) > 0).sum(), "norm_const": 5}
    full = aggregate(loss, mask, agg, **counts)
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], agg, **counts) for i in (0, 2, 4))
    close(parts, full, atol=1e-12)
    close(full, aggregate(loss, mask, agg))  # global counts == the defaults on the whole batch


# ----------------------------------------------------------------------------- GRPO


# Two sequences, T = 3, old_logp = 0 so w = exp(logp); clip 0.2 -> [0.8, 1.2].
#   seq 0, A = +1, w = [1.1, 1.5, 0.5]:  L = -min(w, clip w) = [-1.1, -1.2 (high clip), -0.5]
#   seq 1, A = -1, w = [0.7, 1.3, pad]:  L =  max(w, clip w) = [ 0.8 (low clip), 1.3]
#   sum = -0.7 over 5 tokens; per-seq sums -2.8 (3 tok) and 2.1 (2 tok)
GRPO_W = [[1.1, 1.5, 0.5], [0.7, 1.3, 1.0]]
GRPO_MASK = torch.tensor([[True, True, True], [True, True, False]])
GRPO_ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
GRPO_EXPECTED = {
    "token-mean": -0.7 / 5,
    "seq-mean-token-mean": (-2.8 / 3 + 2.1 / 2) / 2,
    "seq-mean-token-sum": -0.7 / 2,
    "seq-mean-token-sum-norm": -0.7 / (3 * 2),
}


def grpo_inputs():
    logp = torch.tensor(GRPO_W, dtype=torch.float64).log()
    logp[1, 2] = NAN  # garbage in the padding
    old = torch.zeros(2, 3, dtype=torch.float64)
    old[1, 2] = -INF
    return logp.requires_grad_(), old


@pytest.mark.parametrize("agg", AGG_MODES)
def test_grpo_values_by_hand(agg):
    logp, old = grpo_inputs()
    loss, _ = grpo_loss(logp, old, GRPO_ADV, GRPO_MASK, agg=agg)
    close(loss, GRPO_EXPECTED[agg])


def test_grpo_stats_by_hand():
    logp, old = grpo_inputs()
    _, stats = grpo_loss(logp, old, GRPO_ADV, GRPO_MASK)
    close(stats["clipfrac_high"], 1 / 5)  # seq 0, w = 1.5
    close(stats["clipfrac_low"], 1 / 5)  # seq 1, w = 0.7
    close(stats["clipfrac"], 2 / 5)
    close(stats["clipfrac_dual"], 0.0)
    close(stats["ratio_mean"], (1.1 + 1.5 + 0.5 + 0.7 + 1.3) / 5)
    close(stats["ratio_min"], 0.5)
    close(stats["ratio_max"], 1.5)
    close(stats["ppo_kl"], -math.log(1.1 * 1.5 * 0.5 * 0.7 * 1.3) / 5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_grpo_gradient_by_hand():
    # token-mean over 5 tokens: unclipped token -> dL/dlogp = -A w / 5, clipped token -> 0
    logp, old = grpo_inputs()
    loss, _ = grpo_loss(logp, old, GRPO_ADV, GRPO_MASK)
    loss.backward()
    close(logp.grad, [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 1.3 / 5, 0.0]])


def test_grpo_unclipped_gradient_is_minus_a_w_over_num_tokens():
    logp, old, adv, mask = random_batch()
    loss, _ = grpo_loss(logp, old, adv, mask, clip_low=0.99, clip_high=100.0, num_tokens=40)
    loss.backward()
    w = (logp.detach() - old).exp()
    expected = torch.where(mask, -adv[:, None] * w / 40, torch.zeros_like(w))
    close(logp.grad, expected, atol=1e-12)


def test_grpo_dual_clip_by_hand():
    # A = -1, w = [4, 2], c = 3: PPO gives max(w, clip w) = [4, 2]; dual caps at -A c = 3 -> [3, 2]
    logp = leaf([[math.log(4.0), math.log(2.0)]])
    old, mask, adv = (
        torch.zeros(1, 2, dtype=torch.float64),
        torch.ones(1, 2, dtype=torch.bool),
        -torch.ones(1),
    )
    close(grpo_loss(logp, old, adv, mask)[0], (4 + 2) / 2)
    loss, stats = grpo_loss(logp, old, adv, mask, clip_ratio_c=3.0)
    close(loss, (3 + 2) / 2)
    close(stats["clipfrac_dual"], 0.5)
    loss.backward()
    close(logp.grad, [[0.0, 2.0 / 2]])  # capped token: no gradient; other: -A w / 2
    with pytest.raises(ValueError, match="clip_ratio_c"):
        grpo_loss(logp, old, adv, mask, clip_ratio_c=0.5)


@pytest.mark.parametrize(
    ("w", "gamma", "adv", "loss_plain", "loss_weighted"),
    [
        # A > 0, w = 1.1 unclipped; gamma = 1.2 -> w~ = 1.32 > 1.2: clipped at 1.2
        (1.1, 1.2, 1.0, -1.1, -1.2),
        # A < 0, w = 0.85 unclipped; gamma = 0.9 -> w~ = 0.765 < 0.8: clipped at 0.8 (RSPO: sooner)
        (0.85, 0.9, -1.0, 0.85, 0.8),
    ],
)
def test_grpo_log_weight_moves_token_across_clip_boundary(w, gamma, adv, loss_plain, loss_weighted):
    old, mask, a = (
        torch.zeros(1, 1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.bool),
        torch.tensor([adv]),
    )
    logp = leaf([[math.log(w)]])
    loss, stats = grpo_loss(logp, old, a, mask)
    loss.backward()
    close(loss, loss_plain)
    close(logp.grad, [[-adv * w]])
    assert stats["clipfrac"] == 0
    logp = leaf([[math.log(w)]])
    log_weight = torch.tensor([[math.log(gamma)]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logp, old, a, mask, log_weight=log_weight)
    loss.backward()
    close(loss, loss_weighted)
    close(logp.grad, [[0.0]])
    assert stats["clipfrac"] == 1
    assert log_weight.grad is None  # detached inside


def test_grpo_log_weight_scales_unclipped_gradient():
    # w = 1, gamma = 0.9, A = +1: w~ = 0.9 (unclipped for A > 0), dL/dlogp = -gamma w A
    logp = leaf([[0.0]])
    lw = torch.tensor([[math.log(0.9)]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), log_weight=lw)
    loss.backward()
    close(loss, -0.9)
    close(logp.grad, [[-0.9]])
    close(stats["ratio_mean"], 0.9)


@pytest.mark.parametrize("fn", [grpo_loss, gspo_loss, gmpo_loss])
def test_log_weight_none_equals_zeros(fn):
    logp, old, adv, mask = random_batch()
    loss_a, stats_a = fn(logp, old, adv, mask)
    (grad_a,) = torch.autograd.grad(loss_a, logp)
    loss_b, stats_b = fn(logp, old, adv, mask, log_weight=torch.zeros_like(old))
    (grad_b,) = torch.autograd.grad(loss_b, logp)
    close(loss_a, loss_b.detach())
    close(grad_a, grad_b)
    for key in stats_a:
        close(stats_a[key], stats_b[key])


@pytest.mark.parametrize("fn", [grpo_loss, gspo_loss, gmpo_loss])
def test_garbage_in_masked_positions_does_not_leak(fn):
    logp, old, adv, mask = random_batch()
    adv_tok = torch.where(mask, adv[:, None].expand(-1, 5), torch.full((6, 5), NAN, dtype=torch.float64))
    log_weight = torch.where(mask, torch.full_like(old, -0.05), torch.full_like(old, -INF))
    loss, stats = fn(logp, old, adv_tok, mask, log_weight=log_weight)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in stats.values())
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    assert (logp.grad[mask] != 0).any()


def test_bad_shapes_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, torch.zeros(3), x.bool())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_loss(x, torch.zeros(2, 4), torch.zeros(2), x.bool())


# ----------------------------------------------------------------------------- GSPO


def test_gspo_values_gradient_and_stats_by_hand():
    # clip [1 - 3e-4, 1 + 4e-4].
    #   seq 0, A = +1, delta = [0.1, -0.1, 0.3] -> log s0 = 0.1, s0 = e^0.1 > 1.0004: clipped,
    #          every token's loss is -1.0004, gradient 0
    #   seq 1, A = -1, delta = [2e-4, 4e-4, pad] -> log s1 = 3e-4, s1 inside the range: loss = s1,
    #          dL/dlogp_t = -A s1 / (|y_1| = 2) / (num_seqs = 2)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, INF]], dtype=torch.float64)
    delta = torch.tensor([[0.1, -0.1, 0.3], [2e-4, 4e-4, NAN]], dtype=torch.float64)
    logp = (old + delta).detach().requires_grad_()
    mask = GRPO_MASK
    loss, stats = gspo_loss(logp, old, GRPO_ADV, mask)
    s1 = math.exp(3e-4)
    close(loss, (-1.0004 + s1) / 2)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]])
    close(stats["clipfrac_high"], 0.5)  # one of two sequences
    close(stats["clipfrac_low"], 0.0)
    close(stats["ratio_mean"], (math.exp(0.1) + s1) / 2)
    close(stats["ratio_min"], s1)
    close(stats["ratio_max"], math.exp(0.1))
    close(stats["ppo_kl"], -(0.1 - 0.1 + 0.3 + 2e-4 + 4e-4) / 5)


def test_gspo_gradient_is_s_a_over_length():
    # unclipped: dL/dlogp_{i,t} = -s_i A_i / |y_i| / num_seqs for every token of sequence i
    logp, old, adv, mask = random_batch(seed=3)
    loss, _ = gspo_loss(logp, old, adv, mask, clip_low=0.999, clip_high=100.0)
    loss.backward()
    lengths = mask.sum(-1).clamp_min(1)
    s = (masked_mean(logp.detach() - old, mask, dim=-1)).exp()  # [B]
    per_seq = -s * adv / lengths / 5  # 5 non-empty sequences
    close(
        logp.grad, torch.where(mask, per_seq[:, None].expand(-1, 5), torch.zeros(6, 5, dtype=torch.float64))
    )


@pytest.mark.parametrize("padded", [False, True])
def test_gspo_one_token_per_sequence_equals_grpo(padded):
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(8, 1, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(8, 1, generator=g, dtype=torch.float64)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 1, dtype=torch.bool)
    if padded:  # the one token sits at column 0 of a T = 3 row with garbage after it
        pad = torch.full((8, 2), NAN, dtype=torch.float64)
        logp, old = torch.cat([logp, pad], 1), torch.cat([old, pad], 1)
        mask = torch.cat([mask, torch.zeros(8, 2, dtype=torch.bool)], 1)
    logp_a, logp_b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss_a, stats_a = gspo_loss(logp_a, old, adv, mask, clip_low=0.2, clip_high=0.25)
    loss_b, stats_b = grpo_loss(logp_b, old, adv, mask, clip_low=0.2, clip_high=0.25)
    loss_a.backward()
    loss_b.backward()
    assert 0 < stats_b["clipfrac"] < 1  # both clipped and unclipped tokens present
    close(loss_a, loss_b.detach())
    close(logp_a.grad, logp_b.grad)
    for key in ("clipfrac_low", "clipfrac_high", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max"):
        close(stats_a[key], stats_b[key])


def test_gspo_log_weight_enters_as_geometric_mean():
    # gamma = [0.81, 1.0] on two tokens: s~ = GM(gamma) s = 0.9 s (s = 1 here), unclipped for A < 0
    # with a wide clip; loss = -A s~ = 0.9
    logp, old, mask = leaf([[0.0, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    lw = torch.tensor([[math.log(0.81), 0.0]])
    loss, stats = gspo_loss(logp, old, -torch.ones(1), mask, clip_low=0.5, clip_high=0.5, log_weight=lw)
    close(loss, 0.9)
    close(stats["ratio_mean"], 0.9)


# ----------------------------------------------------------------------------- GMPO


def test_gmpo_values_gradient_and_stats_by_hand():
    # clip 0.4 in log space.
    #   seq 0, A = +1, delta = [0.5, 0.1, -0.6]: only the upper side binds -> [0.4, 0.1, -0.6],
    #          mean = -0.1/3, ratio0 = e^(-1/30), L0 = -ratio0
    #   seq 1, A = -2, delta = [0.5, -0.6, pad]: only the lower side binds -> [0.5, -0.4],
    #          mean = 0.05, ratio1 = e^0.05, L1 = 2 ratio1
    #   loss = (L0 + L1) / 2; dL/dlogp = -A_i ratio_i / |y_i| / 2 on unclipped tokens, 0 on clipped
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, INF]], dtype=torch.float64)
    delta = torch.tensor([[0.5, 0.1, -0.6], [0.5, -0.6, NAN]], dtype=torch.float64)
    logp = (old + delta).detach().requires_grad_()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = gmpo_loss(logp, old, adv, GRPO_MASK)
    r0, r1 = math.exp(-1 / 30), math.exp(0.05)
    close(loss, (-r0 + 2 * r1) / 2)
    loss.backward()
    close(logp.grad, [[0.0, -r0 / 6, -r0 / 6], [r1 / 2, 0.0, 0.0]])
    close(stats["clipfrac_high"], 1 / 5)  # seq 0 token 0
    close(stats["clipfrac_low"], 1 / 5)  # seq 1 token 1
    close(stats["ratio_mean"], (r0 + r1) / 2)
    close(stats["ratio_min"], r0)
    close(stats["ratio_max"], r1)


def test_gmpo_sign_aware_clipping():
    # the same delta = [0.6, -0.6] under A = +1 clips only token 0, under A = -1 only token 1
    delta = [[0.6, -0.6]]
    for adv, clipped in ((1.0, 0), (-1.0, 1)):
        logp = leaf(delta)
        loss, _ = gmpo_loss(logp, torch.zeros(1, 2), torch.tensor([adv]), torch.ones(1, 2))
        loss.backward()
        assert logp.grad[0, clipped] == 0
        assert logp.grad[0, 1 - clipped] != 0


def test_gmpo_log_weight_clips_negative_advantage_token_sooner():
    # A = -1, delta = -0.3 unclipped; log gamma = -0.2 -> delta~ = -0.5 < -0.4: clipped, no gradient
    logp = leaf([[-0.3]])
    gmpo_loss(logp, torch.zeros(1, 1), -torch.ones(1), torch.ones(1, 1))[0].backward()
    close(logp.grad, [[math.exp(-0.3)]])
    logp = leaf([[-0.3]])
    lw = torch.tensor([[-0.2]], dtype=torch.float64)
    loss, stats = gmpo_loss(logp, torch.zeros(1, 1), -torch.ones(1), torch.ones(1, 1), log_weight=lw)
    loss.backward()
    close(loss, math.exp(-0.4))
    close(logp.grad, [[0.0]])
    close(stats["clipfrac_low"], 1.0)


def test_gmpo_zero_advantage_uses_positive_sign():
    # A = 0: the loss is 0, and the ratio uses the A >= 0 clip (upper side binds): delta 0.6 -> 0.4
    _, stats = gmpo_loss(torch.tensor([[0.6]]), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    close(stats["ratio_mean"], math.exp(0.4), atol=1e-6)


@pytest.mark.parametrize("fn", [gspo_loss, gmpo_loss])
def test_sequence_losses_microbatch_sum_equals_full_batch(fn):
    logp, old, adv, mask = random_batch(seed=5)
    full, _ = fn(logp, old, adv, mask)
    n = (mask.sum(-1) > 0).sum()
    parts = sum(
        fn(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], num_seqs=n)[0] for i in (0, 2, 4)
    )
    close(parts, full.detach(), atol=1e-12)


def test_grpo_microbatch_sum_equals_full_batch():
    logp, old, adv, mask = random_batch(seed=6)
    for agg in AGG_MODES:
        counts = {"num_tokens": mask.sum(), "num_seqs": (mask.sum(-1) > 0).sum(), "norm_const": 5}
        full, _ = grpo_loss(logp, old, adv, mask, agg=agg, **counts)
        sl = [slice(i, i + 2) for i in (0, 2, 4)]
        parts = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], agg=agg, **counts)[0] for s in sl)
        close(parts, full.detach(), atol=1e-12)


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # delta = logp - ref = [0, ln 2, -ln 2]
    ln2 = math.log(2.0)
    logp = torch.tensor([[0.0, ln2, -ln2]], dtype=torch.float64)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    close(kl_estimate(logp, ref, "k1"), [[0.0, ln2, -ln2]])
    close(kl_estimate(logp, ref, "k2"), [[0.0, ln2**2 / 2, ln2**2 / 2]])
    # k3 = e^-delta + delta - 1: [0, 1/2 + ln 2 - 1, 2 - ln 2 - 1]
    close(kl_estimate(logp, ref, "k3"), [[0.0, ln2 - 0.5, 1 - ln2]])
    close(kl_estimate(logp, ref, "k3+"), [[0.0, ln2 - 0.5, 1 - ln2]])


def test_kl_k3_clamps():
    # delta = -30: -delta is clamped to 20 and k3 = e^20 - 21 to 10
    close(kl_estimate(torch.tensor([[-30.0]]), torch.zeros(1, 1), "k3"), [[10.0]])


def test_kl_k3_plus_gradient_is_k2_gradient():
    ln2 = math.log(2.0)
    grads = {}
    for kind in ("k2", "k3", "k3+"):
        logp = leaf([[0.0, ln2, -ln2]])
        kl_estimate(logp, torch.zeros(1, 3), kind).sum().backward()
        grads[kind] = logp.grad
    close(grads["k3+"], grads["k2"])
    close(grads["k2"], [[0.0, ln2, -ln2]])  # d(delta^2 / 2) = delta
    close(grads["k3"], [[0.0, 0.5, -1.0]])  # d(e^-delta + delta - 1) = 1 - e^-delta


def test_kl_mask_blocks_garbage_and_unknown_kind():
    logp = leaf([[-1.0, NAN]])
    ref = torch.tensor([[-1.5, INF]], dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    kl = kl_estimate(logp, ref, "k3", mask=mask)
    aggregate(kl, mask, "token-mean").backward()
    close(kl, [[math.exp(-0.5) + 0.5 - 1, 0.0]])
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    with pytest.raises(ValueError, match="kl_kind: unknown 'k4'"):
        kl_estimate(logp, ref, "k4")
