"""R3 at its real cost: π_old read off the update forward, and micro-batches trimmed of padding.

R3 (arXiv 2510.11370 §4.1) replays the rollout's experts in the π_old pass and in every update. With one
mini-batch both forwards replay the same routes with gates from the same router at the same weights, so
the learner reads π_old off the update forward (``Learner.fuses_old_pass``) instead of running the
replayed forward twice; and micro-batches sorted by length and trimmed of all-padding columns carry
their routes trimmed and permuted with the tokens. Each arm here runs a real learner step (the
built-in warm-started model, whose answers end at different lengths, a bf16 rollout engine, SGD so
that the weight change is the clipped gradient) on one rollout whose routes are random expert ids,
far from what the routers would pick: a route misaligned by one position or one row changes the loss.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.callbacks.routing_replay import RoutingReplayCallback
from lit_moe_rl.data.countdown import format_prompt, generate_countdown
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.rollout.engine import HFEngine
from lit_moe_rl.routing.store import RouteStore
from tests.test_r3_integration import random_routes, zero_reward

MICRO = 8  # 24 rows: three micro-batches


def make_module(mode: str = "R3", **settings) -> tuple[MoERLModule, RoutingReplayCallback, RolloutCallback]:
    """The built-in model (the same weights every call) with a routing-replay callback attached."""
    torch.manual_seed(0)
    module = MoERLModule(pretrained="builtin:countdown-tiny-moe", micro_batch_size=MICRO, **settings)
    module.configure_model()
    engine = HFEngine(max_new_tokens=12, temperature=1.0, dtype="bfloat16")
    rollout_cb = RolloutCallback(engine=engine, reward=zero_reward, group_size=4)
    callback = RoutingReplayCallback(mode=mode)
    trainer = SimpleNamespace(callbacks=[callback, rollout_cb])
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    return module, callback, rollout_cb


@pytest.fixture(scope="module")
def rollout():
    """24 completions of 6 prompts (lengths 6 to 10), random advantages, random routes."""
    module, _, rollout_cb = make_module()
    rollout_cb._bind(module)
    rows = generate_countdown(6, seed=0, min_numbers=3, max_numbers=3, max_number=20, max_target=100)
    prompts = [format_prompt(row, "compact") for row in rows]
    rollout = rollout_cb.make_rollout(module, prompts, rows, step=0)
    recorded = rollout.routes.full()
    layers, k = recorded.shape[2:]
    experts = module.policy.config.num_experts
    routes = random_routes(rollout.num_sequences, recorded.shape[1], layers, k, experts, seed=1)
    prompt_len, group = rollout.prompt_len, rollout.group_size
    routes[:, :prompt_len] = routes[::group, :prompt_len].repeat_interleave(group, dim=0)  # shared prefill
    routes[recorded < 0] = -1  # padding and the last sampled token still route natively
    advantages = torch.randn(rollout.num_sequences, generator=torch.Generator().manual_seed(0))
    lengths = rollout.response_mask.sum(-1)
    assert lengths.min() < lengths.max() == rollout.response_len  # short micro-batches have columns to trim
    return replace(rollout, routes=RouteStore.pack(routes, prompt_len, group), advantages=advantages)


def train_step(rollout, mode: str = "R3", **settings) -> dict:
    """One learner step on a copy of ``rollout``: metrics, π_old, weight change, decoder forwards' widths."""
    module, callback, _ = make_module(mode, **settings)
    learner, policy = module.learner, module.policy
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    learner.bind(optimizer, scheduler, backward=torch.Tensor.backward, collectives=Collectives())
    widths: list[int] = []
    prompt_calls: list[int] = []
    hook = policy.get_decoder().register_forward_pre_hook(
        lambda _m, _args, kwargs: record_width(widths, prompt_calls, kwargs), with_kwargs=True
    )
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    callback.on_train_batch_start(None, module, {}, 0)
    copy = replace(rollout)
    metrics = learner.step(copy, optimizer_step=0) | callback.step_metrics()
    hook.remove()
    delta = {name: p.detach() - before[name] for name, p in policy.named_parameters()}
    return {"metrics": metrics, "old_logp": copy.old_logp, "delta": delta, "widths": widths,
            "prompt_calls": len(prompt_calls),
            "fused": learner.fuses_old_pass}  # fmt: skip


def record_width(widths: list[int], prompt_calls: list[int], kwargs: dict) -> None:
    """Append the width of a model forward: its columns and those of the KV cache it runs on. A decoder call
    on an empty cache is the prompt half of a shared-prompt forward (lit_moe_rl/learner/prefix.py), counted
    in ``prompt_calls``: the response half that follows counts the forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() == 0:
        prompt_calls.append(kwargs["input_ids"].shape[0])
        return
    widths.append(kwargs["input_ids"].shape[1] + (cache.get_seq_length() if cache is not None else 0))


def assert_same_update(a: dict, b: dict, keys: list[str]) -> None:
    for key in keys:
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-4, abs=1e-6), key
    for name, value in a["delta"].items():
        torch.testing.assert_close(value, b["delta"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(value.abs().max() > 0 for value in a["delta"].values())  # it trained


LOSS_KEYS = [
    "policy/loss",
    "policy/grad_norm",
    "policy/entropy",
    "policy/clipfrac",
    "mismatch/train_infer_kl",
]


def test_r3_with_one_mini_batch_reads_pi_old_off_the_update_forward(rollout):
    """(c) Under R3 the step runs one decoder forward per micro-batch, not two (it ran two before)."""
    fused = train_step(rollout)
    assert fused["fused"]
    micro_batches = -(-rollout.num_sequences // MICRO)
    assert len(fused["widths"]) == micro_batches
    separate = train_step(rollout, old_logp_pass="always")
    assert not separate["fused"] and len(separate["widths"]) == 2 * micro_batches
    # R2 replays what its π_old pass records, and several mini-batches update between forwards: no fusion
    assert not train_step(rollout, "R2")["fused"]
    assert not train_step(rollout, mini_batches=2)["fused"]


def test_fused_pi_old_under_r3_equals_the_separate_replayed_pass(rollout):
    """(a) The same π_old, loss, statistics, routing metrics and update as the separate replayed pass."""
    fused, separate = train_step(rollout), train_step(rollout, old_logp_pass="always")
    torch.testing.assert_close(fused["old_logp"], separate["old_logp"], rtol=1e-5, atol=1e-6)
    mask = rollout.response_mask
    assert fused["old_logp"][mask].lt(0).all() and fused["old_logp"][~mask].eq(0).all()
    # fallback_tokens counts -1 routes in the columns each micro-batch keeps, and the update shuffles rows
    # before sorting them by length: rows of equal length may share another micro-batch, of another width
    routing = [k for k in separate["metrics"] if k.startswith("routing/") and k != "routing/fallback_tokens"]
    assert set(routing) <= set(fused["metrics"])  # every routing metric of the separate pass, fused too
    assert_same_update(fused, separate, LOSS_KEYS + ["policy/ppo_kl", *routing])
    assert fused["metrics"]["routing/rollout_train_router_disagreement"] == 0.0  # the routes replayed
    assert fused["metrics"]["routing/replay_native_router_disagreement"] > 0.5  # random, far from native
    assert fused["metrics"]["policy/ppo_kl"] == 0.0  # ratio exactly 1: π_old is this forward


@pytest.mark.parametrize("old_logp_pass", ["auto", "always"])
def test_trimmed_replay_gives_the_same_loss_and_gradients(rollout, old_logp_pass):
    """(b) Sorted, trimmed micro-batches replay each token's own experts: the same training as untrimmed."""
    trimmed = train_step(rollout, old_logp_pass=old_logp_pass)
    plain = train_step(rollout, old_logp_pass=old_logp_pass, trim_padding=False)
    full = rollout.input_ids.shape[1]
    assert set(plain["widths"]) == {full}
    assert min(trimmed["widths"]) < full  # columns were dropped
    torch.testing.assert_close(trimmed["old_logp"], plain["old_logp"], rtol=1e-5, atol=1e-6)
    assert_same_update(trimmed, plain, LOSS_KEYS + ["routing/replay_native_router_disagreement"])
    assert trimmed["metrics"]["routing/rollout_train_router_disagreement"] == 0.0
    assert trimmed["metrics"]["routing/fallback_real_tokens"] == 0.0


def test_trimmed_r2_replays_the_pi_old_routes(rollout):
    """R2 under trimming: π_old micro-batches of different widths, updates over other rows, same training."""
    trimmed = train_step(rollout, "R2", mini_batches=2)
    plain = train_step(rollout, "R2", mini_batches=2, trim_padding=False)
    assert min(trimmed["widths"]) < rollout.input_ids.shape[1]
    assert_same_update(trimmed, plain, LOSS_KEYS)
    assert trimmed["metrics"]["routing/fallback_real_tokens"] == 0.0


def test_route_store_keeps_the_first_response_positions():
    routes = random_routes(6, 10)
    routes[:, :4] = routes[:1, :4]
    store = RouteStore.pack(routes, 4, 3)
    view = store.select_rows(torch.tensor([5, 1, 2])).keep_response(3)
    assert view.shape == (3, 7, 3, 2) and torch.equal(view.rows(), routes[[5, 1, 2], :7])
    assert torch.equal(view.select_rows(torch.tensor([2])).rows(), routes[[2], :7])  # width kept
    assert view.nbytes == store.nbytes  # a view: nothing copied
    with pytest.raises(ValueError, match="keep_response: width 4 outside"):
        view.keep_response(4)


def test_fit_with_r3_logs_the_same_with_a_fused_or_a_separate_pi_old_pass(tmp_path):
    """Through the CLI (Lightning's manual backward, the callback's logging): fused R3 = separate R3."""
    from tests.helpers import run_fit, train_rows
    from tests.test_r3_integration import BF16, REPLAY

    r3 = (REPLAY, "--trainer.callbacks.mode=R3", BF16)
    fused = train_rows(run_fit(tmp_path / "auto", *r3))
    separate = train_rows(run_fit(tmp_path / "always", *r3, "--model.old_logp_pass=always"))
    assert len(fused) == len(separate) == 2
    keys = [k for k in separate[0] if k.startswith(("policy/", "mismatch/", "routing/", "reward/"))]
    keys = [k for k in keys if k != "routing/fallback_tokens"]  # see the test above
    assert set(keys) <= set(fused[0])
    for key in keys:
        expected = pytest.approx([r[key] for r in separate], rel=1e-4, abs=1e-6)
        assert [r[key] for r in fused] == expected, key


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("R3", {}),
        ("R3", {"old_logp_pass": "always"}),
        ("R2", {"mini_batches": 2}),
        ("R3", {"track_router_shift": True}),
    ],
)
def test_shared_prompts_replay_every_rows_own_routes(rollout, mode, settings):
    """``model.shared_prefix`` (each prompt run once, lit_moe_rl/learner/prefix.py) under R3, R2 and RSPO's
    router capture: the same π_old, update, routing and router-shift metrics as every row running its
    prompt. The routes are random: a prompt route replayed at another row or position changes the loss."""
    shared = train_step(rollout, mode, **settings)
    plain = train_step(rollout, mode, shared_prefix="off", **settings)
    assert shared["prompt_calls"] == len(shared["widths"]) > 0  # every forward ran its prompts once first
    assert plain["prompt_calls"] == 0
    # the same number of forwards; with shared prompts the plan may keep GRPO groups together
    # (batching.micro_plan), so the micro-batches and their trimmed widths may differ
    assert len(shared["widths"]) == len(plain["widths"])
    torch.testing.assert_close(shared["old_logp"], plain["old_logp"], rtol=1e-5, atol=1e-6)
    keys = [k for k in plain["metrics"] if k.startswith(("routing/", "rspo/", "mismatch/"))]
    assert set(keys) <= set(shared["metrics"])
    # routing/fallback_tokens counts the -1 routes in the columns each micro-batch keeps: it follows the plan
    assert_same_update(shared, plain, LOSS_KEYS + [k for k in keys if k != "routing/fallback_tokens"])
    if mode == "R3":
        assert shared["metrics"]["routing/rollout_train_router_disagreement"] == 0.0
