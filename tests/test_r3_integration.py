"""R3 / R2 routing replay through the trainer (arXiv 2510.11370; docs/algorithms.md §3).

The key acceptance is measured at the component level (a real bf16 HFEngine, the real module's
π_old pass, the real callback), on the model of ``configs/tiny_r3.yaml``, fp32 trainer and bf16
rollout on the same weights: with R3 the train-inference KL and the extreme-token fraction drop and
the routers the trainer uses agree 100% with the rollout's. The CLI runs check the wiring and the
logged metrics; the RouteStore tests check it is exact and smaller.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.callbacks.routing_replay import RoutingReplayCallback
from lit_moe_rl.data.countdown import format_prompt, generate_countdown
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.rollout.engine import HFEngine
from lit_moe_rl.routing.record import record_routes
from lit_moe_rl.routing.store import RouteStore
from tests.helpers import read_metrics, run_fit, save_dense_model, train_rows

ROOT = Path(__file__).resolve().parents[1]
R3_CONFIG = yaml.safe_load((ROOT / "configs" / "tiny_r3.yaml").read_text())
AGREEMENT = (
    "router_disagreement",
    "token_disagreement",
    "routers_differing_per_token",
    "overlap_at_k",
    "overlap_at_k/0",
)


def zero_reward(completion: str, sample: dict) -> float:
    return 0.0


def make_module(
    mode: str, rollout_cb: RolloutCallback, **cb_kwargs
) -> tuple[MoERLModule, RoutingReplayCallback]:
    """The tiny_r3.yaml model (same seed, same weights every call) with a routing-replay callback attached."""
    torch.manual_seed(0)
    module = MoERLModule(config=R3_CONFIG["model"]["config"], micro_batch_size=16)
    module.configure_model()
    callback = RoutingReplayCallback(mode=mode, **cb_kwargs)
    trainer = SimpleNamespace(callbacks=[callback, rollout_cb])
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    return module, callback


def old_pass(module: MoERLModule, callback: RoutingReplayCallback, rollout) -> dict[str, float]:
    """The module's π_old pass through the callback's forward context, plus the callback's step metrics."""
    callback.on_train_batch_start(None, module, {}, 0)
    metrics = module.learner.compute_old_logprobs(rollout).reduce(Collectives())
    return metrics | callback.step_metrics()


@pytest.fixture(scope="module")
def bf16_rollout():
    """48 completions of 6 Countdown prompts sampled by a bf16 copy of the fp32 policy, routes recorded."""
    engine = HFEngine(max_new_tokens=10, temperature=1.0, dtype="bfloat16")
    rollout_cb = RolloutCallback(engine=engine, reward=zero_reward, group_size=8)
    module, _ = make_module("R3", rollout_cb)
    assert rollout_cb.record_routes
    rollout_cb._bind(module)
    rows = generate_countdown(6, seed=0, min_numbers=3, max_numbers=3, max_number=20, max_target=100)
    prompts = [format_prompt(row, "compact") for row in rows]
    rollout = rollout_cb.make_rollout(module, prompts, rows, step=0)
    return rollout_cb, rollout


# ------------------------------------------------------------------ the acceptance


def test_r3_lowers_the_mismatch_and_makes_routing_agree(bf16_rollout):
    rollout_cb, rollout = bf16_rollout
    store = rollout.routes
    assert isinstance(store, RouteStore)
    # The G copies of a prompt have identical prefill routes (bf16 engine, CPU): one block per group.
    assert store.shares_prompts and store.prompt.shape[0] == 6
    off = old_pass(*make_module("off", rollout_cb), rollout)
    r3 = old_pass(*make_module("R3", rollout_cb), rollout)
    # bf16 flips routes: without replay the trainer routes differently from the rollout ...
    assert off["routing/rollout_train_router_disagreement"] > 0.01  # measured 0.04-0.10 over seeds
    assert off["routing/rollout_train_token_disagreement"] > off["routing/rollout_train_router_disagreement"]
    # ... with R3 the trainer's experts are the rollout's, at every routed (token, layer)
    assert r3["routing/rollout_train_router_disagreement"] == 0.0
    assert r3["routing/rollout_train_overlap_at_k"] == 1.0
    assert r3["routing/replay_native_router_disagreement"] > 0.0  # the router itself still disagrees
    assert r3["mismatch/train_infer_kl"] < 0.1 * off["mismatch/train_infer_kl"]  # measured 40-150x lower
    assert off["mismatch/extreme_frac_tau2"] > 0.02  # measured 0.05-0.11; R3: 0
    assert r3["mismatch/extreme_frac_tau2"] < off["mismatch/extreme_frac_tau2"]
    assert r3["mismatch/logp_absdiff_mean"] < off["mismatch/logp_absdiff_mean"]
    # padding and the last sampled token route natively; prompt routes are stored once per group
    assert r3["routing/fallback_tokens"] > 0 and r3["routing/fallback_real_tokens"] == 0
    layers, k = store.shape[2:]
    assert r3["routing/route_bytes"] == layers * k * 1  # int8 ids
    assert 0.0 < r3["routing/store_saved_frac"] < 1.0


def test_r2_replays_the_old_pass_routes_in_the_update(bf16_rollout):
    rollout_cb, rollout = bf16_rollout
    module, callback = make_module("R2", rollout_cb)
    metrics = old_pass(module, callback, rollout)
    assert metrics["routing/rollout_train_router_disagreement"] > 0.0  # R2 does nothing about the gap
    micro = rollout.select(torch.tensor([5, 17, 40]))
    old = callback._old_routes(micro)  # θ_old routes of these rows, in the training layout
    assert old.shape == (3, *rollout.routes.shape[1:])
    with torch.no_grad(), callback.forward_context("update", micro):
        module.learner.sequence_logprobs(micro)
    assert callback.step_metrics()["routing/update_replay_native_router_disagreement"] == 0.0  # θ == θ_old


@pytest.mark.parametrize("replay_reference", [False, True])
def test_reference_routes_natively_unless_asked(bf16_rollout, replay_reference):
    rollout_cb, rollout = bf16_rollout
    module, callback = make_module("R3", rollout_cb, replay_reference=replay_reference)
    micro = rollout.select(torch.arange(16))
    routes = micro.routes.rows()
    with torch.no_grad(), callback.forward_context("ref", micro), record_routes(module.policy) as rec:
        module.learner.sequence_logprobs(micro)
    routed = (routes >= 0).all(-1).all(-1) & micro.attention_mask.bool()
    same = (rec.routes.sort(-1).values == routes.sort(-1).values).all(-1).all(-1)[routed]
    assert bool(same.all()) is replay_reference  # bf16 flips some routes: native differs somewhere


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("layers", r"routing_replay \(R3, old pass\): routes: 1 MoE layers in routes, model has 4"),
        ("top_k", r"routing_replay \(R3, old pass\): routes: top-k 1 in routes, model routes top-2"),
        ("dtype", r"routing_replay \(R3, old pass\): routes: dtype torch.float32 is not an integer type"),
        ("range", r"routing_replay \(R3, old pass\): routes: expert id 17 out of range \[0, 16\) at layer 1"),
        (
            "duplicate",
            r"routing_replay \(R3, old pass\): routes: duplicate expert id \d within a token at layer 0",
        ),
        ("partial", r"routing_replay \(R3, old pass\): routes: partial route .* at layer 1"),
        ("align", r"routing_replay \(R3, old pass\): routes: token alignment"),
    ],
)
def test_bad_routes_each_surface_their_own_error(bf16_rollout, case, message):
    rollout_cb, rollout = bf16_rollout
    module, callback = make_module("R3", rollout_cb)
    micro = rollout.select(torch.arange(2))
    routes = micro.routes.rows().clone()
    if case == "layers":
        routes = routes[:, :, :1]
    elif case == "top_k":
        routes = routes[..., :1]
    elif case == "dtype":
        routes = routes.float()
    elif case == "range":
        routes[0, 2, 1, 1] = 17
    elif case == "duplicate":
        routes[1, 3, 0, 1] = routes[1, 3, 0, 0]
    elif case == "partial":
        routes[0, micro.prompt_len, 1, 0] = -1
    elif case == "align":
        routes = routes[:, 1:]
    micro.routes = routes
    with pytest.raises(ValueError, match=message), callback.forward_context("old", micro):
        module.learner.sequence_logprobs(micro)


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="routing_replay.mode: must be one of off, R3, R2, got 'R4'"):
        RoutingReplayCallback(mode="R4")
    with pytest.raises(ValueError, match="routing_replay.replay_reference: needs"):
        RoutingReplayCallback(mode="off", replay_reference=True)
    module = SimpleNamespace(add_forward_context=lambda f: None)
    with pytest.raises(ValueError, match="routing_replay: needs .*RolloutCallback"):
        RoutingReplayCallback().setup(SimpleNamespace(callbacks=[]), module, "fit")


# ------------------------------------------------------------------ through the CLI

REPLAY = "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback"
BF16 = "--rollout.engine.dtype=bfloat16"


def test_fit_with_r3_logs_the_routing_metrics(tmp_path):
    rows = train_rows(run_fit(tmp_path, REPLAY, "--trainer.callbacks.mode=R3", BF16))
    assert len(rows) == 2
    for row in rows:
        for name in AGREEMENT:
            assert 0.0 <= row[f"routing/replay_native_{name}"] <= 2.0
            assert math.isfinite(row[f"routing/rollout_train_{name}"])
        assert row["routing/rollout_train_router_disagreement"] == 0.0
        assert row["routing/fallback_real_tokens"] == 0.0
        for name in (
            "fallback_tokens",
            "fallback_real_tokens",
            "route_bytes",
            "store_bytes",
            "store_saved_frac",
        ):
            assert math.isfinite(row[f"routing/{name}"])
        assert row["routing/update_replay_native_router_disagreement"] >= 0.0
        assert math.isfinite(row["mismatch/train_infer_kl"])


def test_fit_with_r2_logs_the_routing_metrics(tmp_path):
    rows = train_rows(
        run_fit(tmp_path, REPLAY, "--trainer.callbacks.mode=R2", BF16, "--model.mini_batches=2")
    )
    assert (
        len(rows) == 1
    )  # 2 optimizer steps = 1 rollout x 2 mini-batches: the second one replays after an update
    for row in rows:
        assert row["routing/fallback_tokens"] == 0.0  # the θ_old pass routed every position
        assert 0.0 <= row["routing/update_replay_native_router_disagreement"] <= 1.0
        assert 0.0 <= row["routing/rollout_train_router_disagreement"] <= 1.0
        assert "routing/replay_native_router_disagreement" not in row


def test_dense_model_with_r3_is_an_error_at_start_up(capsys, tmp_path):
    dense = save_dense_model(tmp_path / "dense")
    with pytest.raises(SystemExit):
        run_fit(tmp_path, f"--model.pretrained={dense}", "--model.config=null", REPLAY)
    err = capsys.readouterr().err
    assert "routing_replay (mode R3): model has no MoE layer" in err
    assert not [r for r in _all_rows(tmp_path) if r.get("reward/mean")]  # no training step ran


def _all_rows(tmp_path: Path) -> list[dict[str, str]]:
    return [row for path in tmp_path.rglob("metrics.csv") for row in read_metrics(path)]


# ------------------------------------------------------------------ the route store


def random_routes(rows: int, seq: int, layers: int = 3, k: int = 2, experts: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(rows, seq, layers, experts, generator=gen).argsort(-1)[..., :k].to(torch.int8)


def test_route_store_materialises_exactly_and_is_smaller():
    groups, size, prompt_len, seq = 4, 8, 12, 20
    routes = random_routes(groups * size, seq)
    routes[:, :prompt_len] = routes[::size, :prompt_len].repeat_interleave(size, dim=0)  # shared prefill
    routes[:size, :2] = -1  # left padding of prompt 0
    store = RouteStore.pack(routes, prompt_len, size)
    assert store.shape == routes.shape and store.dtype == routes.dtype
    assert torch.equal(store.full(), routes)
    index = torch.tensor([31, 0, 9, 9, 17])
    assert torch.equal(store.rows(index), routes[index])
    view = store.select_rows(torch.tensor([3, 8, 20, 30])).select_rows(torch.tensor([2, 0]))
    assert len(view) == 2 and torch.equal(view.rows(), routes[[20, 3]])
    assert store.prompt.shape[0] == groups
    dense_bytes = routes.numel() * routes.element_size()
    assert store.dense_nbytes == dense_bytes
    per_position = 3 * 2  # L * K int8 ids
    assert (
        store.nbytes
        == (groups * prompt_len + groups * size * (seq - prompt_len)) * per_position + 8 * groups * size
    )
    assert store.nbytes < 0.7 * dense_bytes
    assert store.bytes_per_position == 3 * 2


def test_route_store_keeps_per_row_prompts_when_a_group_disagrees():
    routes = random_routes(6, 10)
    routes[:, :4] = routes[:1, :4]
    routes[4, 1] = torch.tensor([[7, 6], [5, 4], [3, 2]], dtype=torch.int8)  # group 1 (rows 3-5) differs
    store = RouteStore.pack(routes, 4, 3)
    assert store.prompt.shape[0] == 1 + 3
    assert torch.equal(store.full(), routes)
    odd = RouteStore.pack(routes[:5], 4, 3)  # not a whole number of groups: one block per row
    assert odd.prompt.shape[0] == 5 and torch.equal(odd.full(), routes[:5])


def test_rollout_select_slices_the_store_and_records_rows(bf16_rollout):
    _, rollout = bf16_rollout
    kept = rollout.select(torch.arange(8, 24))  # e.g. a DAPO group filter
    micro = kept.select(torch.tensor([1, 15]))
    assert torch.equal(micro.rows, torch.tensor([1, 15]))
    assert torch.equal(micro.routes.rows(), rollout.routes.rows(torch.tensor([9, 23])))
    assert micro.routes.nbytes == rollout.routes.nbytes  # a view: nothing copied
