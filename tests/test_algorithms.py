"""The algorithm classes (``model.algorithm`` class_path): defaults, validation, wiring to losses.py.

The loss functions have hand-worked tests in test_losses.py; here the classes are checked as the
module uses them: that each passes its hyperparameters through, that the router-shift weight enters
exactly as a shift of the token log-ratio (docs/algorithms.md §4.3, v2), that GSPO on one-token sequences
is GRPO, and that every class runs a short fit when picked by class_path on the command line.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_moe_rl import losses
from lit_moe_rl.algorithms import DAPO, GMPO, GRPO, GSPO, RSPO, Algorithm, DrGRPO
from tests.helpers import ROOT, read_metrics, run_fit

CLASSES = [GRPO, DAPO, DrGRPO, GSPO, GMPO, RSPO]
NORMS = dict(num_tokens=11.0, num_seqs=4.0, norm_const=5.0)


def batch(seed: int = 0, spread: float = 0.3):
    """4 sequences x 5 tokens, ragged mask, per-sequence advantages of both signs, fp64."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    old = logp + spread * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    return logp, old, adv, mask


def objective(algo: Algorithm, logp, old, adv, mask, log_weight=None, token_weight=None):
    leaf = logp.clone().requires_grad_()
    loss, stats = algo.objective(
        leaf, old, adv, mask, log_weight=log_weight, token_weight=token_weight, **NORMS
    )
    loss.backward()
    return loss.detach(), leaf.grad, stats


# ----------------------------------------------------------------------------- defaults and validation


def test_defaults_follow_the_papers():
    assert (GRPO().clip_low, GRPO().clip_high, GRPO().agg) == (0.2, 0.2, "token-mean")
    dapo = DAPO()
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling) == (0.2, 0.28, True)
    drgrpo = DrGRPO()
    assert drgrpo.agg == "seq-mean-token-sum-norm"
    assert not drgrpo.norm_adv_by_std
    assert (GSPO().clip_low, GSPO().clip_high) == (3e-4, 4e-4)
    assert (GMPO().clip_low, GMPO().clip_high) == (0.4, 0.4)
    rspo = RSPO()
    assert (rspo.clip_low, rspo.clip_high, rspo.router_shift_floor) == (0.4, 0.4, 0.8)
    assert rspo.router_shift and rspo.router_shift_layer_reduce == "mean" and isinstance(rspo, GMPO)
    assert not any(cls().router_shift for cls in CLASSES if cls is not RSPO)
    assert all(cls(kl_coef=0.0).kl_coef == 0.0 for cls in CLASSES)  # R3 and IcePop train without KL


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_low": -0.1}, "model.algorithm.clip_low: must be >= 0"),
        ({"clip_high": -1.0}, "model.algorithm.clip_high: must be >= 0"),
        ({"router_shift_floor": 1.5}, r"algorithm.router_shift_floor: must be in \[0, 1\]"),
        ({"router_shift_floor": -0.1}, r"algorithm.router_shift_floor: must be in \[0, 1\]"),
        ({"kl_coef": -0.01}, "algorithm.kl_coef: must be >= 0"),
        ({"kl_kind": "k4"}, "algorithm.kl_kind: must be one of k1, k2, k3, k3\\+, got 'k4'"),
    ],
)
def test_constructor_errors_name_the_setting(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        cls(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls", [GRPO, GSPO, GMPO, RSPO])  # DAPO and DrGRPO do not expose it
def test_unknown_layer_reduce_is_refused(cls):
    with pytest.raises(
        ValueError, match="algorithm.router_shift_layer_reduce: must be 'mean' or 'sum', got 'max'"
    ):
        cls(router_shift_layer_reduce="max")


@pytest.mark.parametrize("cls", [GRPO, DAPO])
def test_unknown_aggregation_is_refused(cls):
    with pytest.raises(ValueError, match="algorithm.agg: must be one of token-mean, .*, got 'token_mean'"):
        cls(agg="token_mean")


def test_rspo_always_weights():
    with pytest.raises(TypeError):
        RSPO(router_shift=False)  # RSPO is GMPO + RS; GMPO(router_shift=False) is the unweighted one


# ----------------------------------------------------------------------------- wiring to losses.py


def test_classes_call_their_loss_with_their_hyperparameters():
    logp, old, adv, mask = batch()
    cases = [
        (
            GRPO(0.1, 0.3, agg="seq-mean-token-sum", clip_ratio_c=3.0),
            losses.grpo_loss,
            dict(clip_low=0.1, clip_high=0.3, agg="seq-mean-token-sum", clip_ratio_c=3.0, **NORMS),
        ),
        (DAPO(), losses.grpo_loss, dict(clip_low=0.2, clip_high=0.28, agg="token-mean", **NORMS)),
        (
            DrGRPO(0.15, 0.25),
            losses.grpo_loss,
            dict(clip_low=0.15, clip_high=0.25, agg="seq-mean-token-sum-norm", **NORMS),
        ),
        (GSPO(0.01, 0.02), losses.gspo_loss, dict(clip_low=0.01, clip_high=0.02, num_seqs=4.0)),
        (GMPO(0.2, 0.3), losses.gmpo_loss, dict(clip_low=0.2, clip_high=0.3, num_seqs=4.0)),
    ]
    for algo, fn, kwargs in cases:
        got, got_grad, _ = objective(algo, logp, old, adv, mask)
        leaf = logp.clone().requires_grad_()
        want, _ = fn(leaf, old, adv, mask, **kwargs)
        want.backward()
        torch.testing.assert_close(got, want.detach(), msg=repr(algo))
        torch.testing.assert_close(got_grad, leaf.grad, msg=repr(algo))


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO, GSPO, GMPO, RSPO])
def test_router_shift_weight_is_a_shift_of_the_old_logp(cls):
    # w~ = gamma~ w (v2, before clipping): objective(old, log gamma) == objective(old - log gamma),
    # for the loss, its gradient and which tokens clip
    logp, old, adv, mask = batch(seed=1)
    gamma = torch.tensor([[0.8, 0.95, 1.0, 0.7, 0.9]] * 4, dtype=torch.float64)
    algo = cls(router_shift=True) if cls is not RSPO else cls()
    loss_w, grad_w, stats_w = objective(algo, logp, old, adv, mask, log_weight=gamma.log())
    loss_s, grad_s, stats_s = objective(algo, logp, old - gamma.log(), adv, mask)
    torch.testing.assert_close(loss_w, loss_s)
    torch.testing.assert_close(grad_w, grad_s)
    for key in ("clipfrac_low", "clipfrac_high"):
        torch.testing.assert_close(stats_w[key], stats_s[key])
    unweighted, _, _ = objective(algo, logp, old, adv, mask)
    assert not torch.allclose(loss_w, unweighted)  # the weight does something here


def test_rspo_with_unit_gamma_is_gmpo():
    # gamma~ = 1 (router unchanged, any floor, or floor = 1): RSPO's objective is GMPO's, bit for bit
    logp, old, adv, mask = batch(seed=2)
    for floor in (0.0, 0.8, 1.0):
        rspo = objective(RSPO(0.3, 0.3, router_shift_floor=floor), logp, old, adv, mask, torch.zeros(4, 5))
        gmpo = objective(GMPO(0.3, 0.3), logp, old, adv, mask)
        assert torch.equal(rspo[0], gmpo[0]) and torch.equal(rspo[1], gmpo[1])


def test_gspo_on_one_token_sequences_is_grpo():
    # |y_i| = 1: the sequence ratio is the token ratio, so GSPO's sequence clip is GRPO's token clip,
    # and both aggregate to a mean over sequences = a mean over tokens (docs/algorithms.md §2.5)
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(8, 1, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(8, 1, generator=g, dtype=torch.float64)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 1, dtype=torch.bool)
    norms = dict(num_tokens=8.0, num_seqs=8.0, norm_const=1.0)
    results = []
    for algo in (GSPO(0.2, 0.25), GRPO(0.2, 0.25)):
        leaf = logp.clone().requires_grad_()
        loss, stats = algo.objective(leaf, old, adv, mask, log_weight=None, token_weight=None, **norms)
        loss.backward()
        results.append((loss.detach(), leaf.grad, stats))
    (loss_s, grad_s, stats_s), (loss_g, grad_g, stats_g) = results
    assert 0 < float(stats_g["clipfrac"]) < 1  # both clipped and unclipped tokens
    torch.testing.assert_close(loss_s, loss_g)
    torch.testing.assert_close(grad_s, grad_g)
    torch.testing.assert_close(stats_s["clipfrac"], stats_g["clipfrac"])


def test_token_weight_scales_every_objective():
    # a constant correction weight c (TIS/IcePop-style, detached) scales the loss and its gradient by c
    logp, old, adv, mask = batch(seed=4)
    for cls in CLASSES:
        plain = objective(cls(), logp, old, adv, mask)
        half = torch.full((4, 5), 0.5, dtype=torch.float64)
        scaled = objective(cls(), logp, old, adv, mask, token_weight=half)
        torch.testing.assert_close(scaled[0], 0.5 * plain[0], msg=cls.__name__)
        torch.testing.assert_close(scaled[1], 0.5 * plain[1], msg=cls.__name__)


def test_advantages_and_dynamic_sampling():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5])  # G = 2: groups (1, 0), (1, 1), (.5, .5)
    std_adv = GRPO().advantages(rewards, 2)
    mean_adv = DrGRPO().advantages(rewards, 2)
    torch.testing.assert_close(mean_adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    assert std_adv[0] > 0.5 and math.isclose(float(std_adv[0]), -float(std_adv[1]), rel_tol=1e-6)
    assert DAPO().keep_groups(rewards, 2).tolist() == [True, True, False, False, False, False]
    assert GRPO().keep_groups(rewards, 2) is None


# ----------------------------------------------------------------------------- class_path on the CLI


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_algorithm_fits_by_class_path(cls, tmp_path):
    extra = [
        f"--model.algorithm={cls.__module__}.{cls.__name__}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",  # 2 rollouts, even if DAPO's dynamic sampling drops a whole one
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
    ]
    if cls is GMPO:  # a plain GMPO run plus RouterShiftCallback, from the catalogue snippet
        extra.append(f"--trainer.callbacks+={ROOT / 'callbacks' / 'router_shift.yaml'}")
    rows = read_metrics(run_fit(tmp_path, *extra, steps=2))
    assert len(rows) == 2
    assert all(r["reward/mean"] for r in rows)
    tracked = cls in (RSPO, GMPO)
    assert bool(rows[0].get("rspo/gamma_mean")) == tracked


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_low": 1.0}, r"model.algorithm.clip_low: must be < 1"),
        ({"clip_ratio_c": 1.0}, r"model.algorithm.clip_ratio_c: must be > 1"),
        ({"clip_high": float("nan")}, r"model.algorithm.clip_high: must be >= 0, got nan"),
    ],
)
def test_token_ratio_ranges_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**kwargs)


def test_base_classes_are_abstract():
    from lit_moe_rl.algorithms import Algorithm, SequenceObjective

    for base in (Algorithm, SequenceObjective):
        with pytest.raises(TypeError, match="abstract"):
            base(0.2, 0.2)
