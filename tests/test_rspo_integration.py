"""RSPO router-shift weighting through the real trainer (arXiv 2510.23027 v2; docs/algorithms.md §4).

Invariants of docs/algorithms.md §4.2-4.3 checked at the integration level on a tiny random Qwen3-MoE:
gamma is exactly 1 while θ == θ_old, moves once the router has, is floored and detached, and with
the weight off (or neutral) every algorithm trains exactly as its base objective. Plus
RouterShiftCallback (tracking for any algorithm, heatmap, expert-load entropy, state) and the
``configs/tiny_rspo.yaml`` recipe end to end.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lit_moe_rl.algorithms import GMPO, RSPO
from lit_moe_rl.callbacks.plots import layer_step_heatmap
from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.callbacks.router_shift import HEATMAP_KEY, RouterShiftCallback, layer_shift_column
from lit_moe_rl.cli import main
from lit_moe_rl.data.datamodule import PromptDataModule
from lit_moe_rl.learner import Learner
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.rollout.engine import HFEngine
from tests.helpers import ROOT, latest_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 2  # tiny_moe_config default: 2 MoE layers, 8 experts, top-2
RSPO_METRICS = [
    "rspo/gamma_mean",
    "rspo/gamma_p10",
    "rspo/gamma_p50",
    "rspo/gamma_min",
    "rspo/floor_frac",
    "rspo/shift_mean",
    "rspo/shift_p90",
    "rspo/shift_p99",
    "rspo/topk_changed_router_frac",
    "rspo/topk_changed_token_frac",
]


def varied_reward(completion: str, sample: dict) -> float:
    """Deterministic, dense: different completions of one prompt get different rewards, so advantages
    are non-zero and the policy (and its routers) move. A random model rarely earns Countdown reward."""
    return float(sum(map(ord, completion)) % 5)


def run_fit(algorithm, *, mini_batches=1, rollouts=1, lr=1e-2, callbacks=(), logger=False, root=None):
    """Fit a fresh tiny module for ``rollouts`` rollouts; return the module and what each update saw.

    ``updates``: the stats dict of every mini-batch step (before averaging over the rollout);
    ``objective_calls``: the ``log_weight`` and ``logp`` the algorithm's objective received.
    """
    torch.manual_seed(0)
    module = MoERLModule(
        config={"family": "qwen3_moe"},
        algorithm=algorithm,
        mini_batches=mini_batches,
        lr=lr,
        micro_batch_size=8,
    )
    updates: list[dict[str, float]] = []
    objective_calls: list[dict[str, torch.Tensor | None]] = []
    step, objective = Learner.mini_batch_step, algorithm.objective

    def mini_batch_spy(learner, rollout, rows, **kwargs):
        stats = step(learner, rollout, rows, **kwargs)
        updates.append(copy.deepcopy(stats).reduce(Collectives()))
        return stats

    def objective_spy(logp, *args, log_weight, **kwargs):
        objective_calls.append({"logp": logp, "log_weight": log_weight})
        return objective(logp, *args, log_weight=log_weight, **kwargs)

    Learner.mini_batch_step = mini_batch_spy  # the learner is built inside fit (configure_model)
    algorithm.objective = objective_spy
    data = PromptDataModule(
        template="compact", num_train=8, num_val=0, batch_size=2, max_numbers=3, max_number=20, max_target=100
    )
    rollout = RolloutCallback(engine=HFEngine(max_new_tokens=6), reward=varied_reward, group_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=rollouts * mini_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[rollout, *callbacks],
    )
    try:
        trainer.fit(module, data)
    finally:
        Learner.mini_batch_step = step
    return SimpleNamespace(module=module, trainer=trainer, updates=updates, objective_calls=objective_calls)


def params(module: MoERLModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.policy.named_parameters()}


def assert_same_params(a: MoERLModule, b: MoERLModule) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    changed = [name for name in pa if not torch.equal(pa[name], pb[name])]
    assert not changed, f"parameters differ: {changed[:3]}"


# ----------------------------------------------------------------------------- gamma in the trainer
# Each fit is shared by the tests that read it (module-scoped fixtures): a fit costs about a second.


@pytest.fixture(scope="module")
def rspo_on_policy():
    """RSPO, floor 0, mini_batches: 1: the one update runs at the weights the old pass used."""
    return run_fit(RSPO(router_shift_floor=0.0), mini_batches=1)


@pytest.fixture(scope="module")
def rspo_two_updates():
    """RSPO, floor 0 (gamma unconstrained), mini_batches: 2: the second update sees a moved router."""
    return run_fit(RSPO(router_shift_floor=0.0), mini_batches=2)


@pytest.fixture(scope="module")
def gmpo_plain():
    """GMPO, 2 rollouts x 2 mini-batches, no router-shift tracking."""
    return run_fit(GMPO(), mini_batches=2, rollouts=2)


@pytest.fixture(scope="module")
def gmpo_tracked(tmp_path_factory):
    """The same GMPO run with RouterShiftCallback (heatmap every 2 steps) and a CSV logger."""
    root = tmp_path_factory.mktemp("gmpo_tracked")
    callback = RouterShiftCallback(every_n_steps=2)
    run = run_fit(
        GMPO(),
        mini_batches=2,
        rollouts=2,
        callbacks=[callback],
        logger=CSVLogger(root, name="run"),
        root=root,
    )
    run.callback = callback
    return run


def test_gamma_is_one_while_theta_equals_theta_old(rspo_on_policy):
    # the router has not moved: Delta = 0, gamma = 1, no token at the floor, no top-K set changed (§4.2)
    (stats,) = rspo_on_policy.updates
    for key in ("rspo/gamma_mean", "rspo/gamma_min", "rspo/gamma_p10", "rspo/gamma_p50"):
        assert stats[key] == pytest.approx(1.0, abs=1e-6), key
    assert stats["rspo/floor_frac"] == 0.0
    assert stats["rspo/shift_mean"] == pytest.approx(0.0, abs=1e-6)
    assert stats["rspo/topk_changed_router_frac"] == 0.0
    (call,) = rspo_on_policy.objective_calls
    torch.testing.assert_close(call["log_weight"], torch.zeros_like(call["log_weight"]), atol=1e-6, rtol=0)


def test_second_mini_batch_sees_the_router_move(rspo_two_updates):
    first, second = rspo_two_updates.updates
    assert first["rspo/gamma_mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["rspo/gamma_min"] < 1.0 - 1e-4  # the first optimizer step moved the routers
    assert second["rspo/shift_mean"] > 1e-4
    assert second[f"rspo/layer_shift/{LAYERS - 1}"] > 0
    # logged once per rollout: the mean over its mini-batches
    logged = float(rspo_two_updates.trainer.callback_metrics["rspo/gamma_mean"])
    assert logged == pytest.approx((first["rspo/gamma_mean"] + second["rspo/gamma_mean"]) / 2, rel=1e-6)


def test_gamma_carries_no_gradient(rspo_two_updates):
    # gamma~ = sg[max(gamma, floor)] (§4.2): the weight reaching the objective is a constant, although
    # the update forward that produced the current router log-probs ran under grad
    for call in rspo_two_updates.objective_calls:
        assert call["logp"].requires_grad
        assert not call["log_weight"].requires_grad and call["log_weight"].grad_fn is None
    assert (rspo_two_updates.objective_calls[-1]["log_weight"] < 0).any()


def test_floor_binds(rspo_two_updates):
    # after one step the shift is a few 1e-2: a floor just below 1 binds on most tokens, a tiny one never
    high = run_fit(RSPO(router_shift_floor=0.999), mini_batches=2)
    stats = high.updates[1]
    assert stats["rspo/floor_frac"] > 0.5
    assert stats["rspo/gamma_min"] == pytest.approx(0.999, abs=1e-6)  # gamma~ never below the floor
    assert high.objective_calls[-1]["log_weight"].min() >= math.log(0.999) - 1e-6
    low = rspo_two_updates.updates[1]  # floor 0, same rollout and first step
    assert low["rspo/floor_frac"] == 0.0
    assert low["rspo/gamma_min"] < 0.999


# ----------------------------------------------------------------------------- weight off = base objective


def test_rspo_with_identical_router_gives_the_gmpo_loss(rspo_on_policy):
    # floor 0 (gamma unconstrained) but theta == theta_old: gamma == 1, so RSPO's loss is GMPO's
    gmpo = run_fit(GMPO(), mini_batches=1).updates[0]
    rspo = rspo_on_policy.updates[0]
    assert rspo["policy/loss"] == pytest.approx(gmpo["policy/loss"], rel=1e-5, abs=1e-7)
    assert rspo["policy/ratio_mean"] == pytest.approx(gmpo["policy/ratio_mean"], rel=1e-6)


def test_floor_one_makes_rspo_train_exactly_as_gmpo(gmpo_plain):
    # floor = 1 pins gamma~ to 1 (log weight exactly 0): RSPO == GMPO, weights bit for bit, even
    # though the routers move between mini-batches
    rspo = run_fit(RSPO(router_shift_floor=1.0), mini_batches=2, rollouts=2)
    assert rspo.updates[1]["rspo/floor_frac"] > 0  # the raw gamma did drop below 1
    assert_same_params(rspo.module, gmpo_plain.module)


def test_tracking_without_weighting_leaves_training_unchanged(gmpo_tracked, gmpo_plain):
    # RouterShiftCallback on GMPO (router_shift: false): rspo/ metrics appear, the loss gets no
    # weight, and the weights are bit-identical to the same run without the callback
    assert gmpo_tracked.module.hparams.track_router_shift
    calls = gmpo_tracked.objective_calls + gmpo_plain.objective_calls
    assert all(call["log_weight"] is None for call in calls)
    assert "rspo/gamma_mean" in gmpo_tracked.updates[1] and "rspo/gamma_mean" not in gmpo_plain.updates[1]
    assert gmpo_tracked.updates[1]["rspo/gamma_min"] < 1.0
    assert_same_params(gmpo_tracked.module, gmpo_plain.module)


# ----------------------------------------------------------------------------- RouterShiftCallback


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "router_shift.every_n_steps"),
        ({"every_n_steps": 2.5}, "router_shift.every_n_steps"),
        ({"every_n_steps": True}, "router_shift.every_n_steps"),
        ({"heatmap": "yes"}, "router_shift.heatmap"),
        ({"log_expert_load": 1}, "router_shift.log_expert_load"),
    ],
)
def test_callback_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        RouterShiftCallback(**kwargs)
    assert "\n" not in str(err.value)


def test_callback_fails_at_start_up_on_a_dense_model(tmp_path):
    dense = dict(
        model_type="qwen3",
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    module = MoERLModule(config=dense, algorithm=GMPO())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[RolloutCallback(group_size=2), RouterShiftCallback()],
    )
    data = PromptDataModule(template="compact", num_train=4, num_val=0, batch_size=2, max_numbers=3)
    with pytest.raises(ValueError, match=r"^router_shift: model has no MoE layer"):
        trainer.fit(module, data)


def test_callback_needs_the_rl_module():
    with pytest.raises(ValueError, match="router_shift: RouterShiftCallback needs lit_moe_rl's MoERLModule"):
        RouterShiftCallback().setup(None, L.LightningModule(), "fit")


def test_callback_heatmaps_and_expert_load_in_a_run(gmpo_tracked):
    callback, trainer = gmpo_tracked.callback, gmpo_tracked.trainer
    folder = Path(trainer.log_dir) / "router_shift"
    assert sorted(p.name for p in folder.iterdir()) == ["heatmap_step2.png", "heatmap_step4.png"]
    assert (folder / "heatmap_step4.png").read_bytes()[:8] == PNG_MAGIC
    assert callback.steps == [2, 4] and callback.last_heatmap_step == 4
    assert callback.matrix().shape == (LAYERS, 2)
    logged = float(trainer.callback_metrics[f"rspo/layer_shift/{LAYERS - 1}"])
    assert callback.columns[-1][LAYERS - 1] == pytest.approx(logged)
    rows = read_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
    for layer in range(LAYERS):
        key = f"routing/expert_load_entropy/{layer}"
        values = [float(r[key]) for r in rows if r[key]]
        assert len(values) == 2 and all(0.0 < v <= 1.0 for v in values)


def test_callback_state_round_trip_and_final_heatmap(tmp_path):
    callback = RouterShiftCallback(every_n_steps=100)
    callback.steps, callback.columns = [4, 8], [[0.1, 0.2], [0.3, float("nan")]]
    callback.last_heatmap_step = 4
    restored = RouterShiftCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.steps == [4, 8] and restored.last_heatmap_step == 4
    np.testing.assert_array_equal(restored.matrix(), callback.matrix())
    # at the end of fit a heatmap covers the steps since the last one, logged to every W&B logger

    class RecordingWandb(WandbLogger):
        def __init__(self) -> None:  # no wandb run: just record the call
            self.images = []

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images, step))

    wandb = RecordingWandb()
    trainer = SimpleNamespace(
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        global_step=8,
        is_global_zero=True,
        loggers=[wandb],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=2)),
    )
    restored.heatmap = True
    restored.on_fit_end(trainer, None)
    png = tmp_path / "router_shift" / "heatmap_step8.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert wandb.images == [(HEATMAP_KEY, [str(png)], 2)]
    restored.on_fit_end(trainer, None)  # nothing new since: no second write
    assert len(wandb.images) == 1


def test_layer_shift_column_and_heatmap_helper(tmp_path):
    metrics = {"rspo/layer_shift/1": torch.tensor(0.5), "rspo/layer_shift/0": 0.25, "rspo/shift_mean": 9.0}
    assert layer_shift_column(metrics) == [0.25, 0.5]
    assert layer_shift_column({"rspo/gamma_mean": 1.0}) == []
    with pytest.raises(ValueError, match=r"layer_step_heatmap: matrix must be \[layers, len\(steps\)\]"):
        layer_step_heatmap(np.zeros((2, 3)), [1, 2], tmp_path / "x.png")
    path = layer_step_heatmap(np.array([[0.1, np.nan, 0.3]]), [1, 5, 9], tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- the recipe, end to end


def test_tiny_rspo_config_logs_every_rspo_metric_and_a_heatmap(tmp_path):
    main(
        [
            "fit",
            f"--config={ROOT / 'configs' / 'tiny_rspo.yaml'}",
            "--trainer.max_steps=4",  # 2 rollouts x mini_batches 2
            "--model.mini_batches=2",
            "--model.micro_batch_size=8",
            "--data.num_train=16",
            "--data.num_val=2",
            "--data.batch_size=2",
            "--rollout.group_size=4",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    metrics = latest_metrics(tmp_path)
    rows = read_metrics(metrics)
    layers = 4  # the recipe's num_hidden_layers
    expected = RSPO_METRICS + [f"rspo/layer_shift/{i}" for i in range(layers)]
    expected += [f"routing/expert_load_entropy/{i}" for i in range(layers)]
    for key in expected:
        values = [r[key] for r in rows if r.get(key)]
        assert len(values) == 2, key
        assert all(math.isfinite(float(v)) for v in values), key
    assert float(rows[-1]["rspo/gamma_mean"]) < 1.0  # the second mini-batch of each rollout moved
    assert (metrics.parent / "router_shift" / "heatmap_step4.png").read_bytes()[:8] == PNG_MAGIC
