"""``model.torch_compile`` (lit_moe_rl/compile.py): the compiled update equals the eager one.

One learner step on a tiny random Qwen3-MoE and a fixed synthetic rollout, eager and compiled, with the
same weights: the loss and every statistic, π_old and every gradient agree, without routing hooks, under
R3 replay (forward hooks on the routers, registered per micro-batch after the compile), with RSPO's
router-logit capture and with gradient checkpointing. Equality under replay is what the eager routers buy:
compiled whole, a decoder layer runs the hooks it was traced with, and ignores the replay.
"""

from __future__ import annotations

import pytest
import torch

from lit_moe_rl.algorithms import GRPO
from lit_moe_rl.batch import Rollout
from lit_moe_rl.compile import CompileSettings, compile_units, parse_torch_compile
from lit_moe_rl.errors import SettingsError
from lit_moe_rl.learner import Learner, LearnerSettings
from lit_moe_rl.lora import apply_lora
from lit_moe_rl.policy import load_policy, position_ids_from_mask, prepare_for_rl
from lit_moe_rl.routing.adapters import find_moe_routers
from lit_moe_rl.routing.replay import replay_routes
from tests.helpers import run_fit, train_rows

N, P, R, LAYERS, K, EXPERTS = 8, 5, 7, 2, 2, 8


class GradRecorder:
    """An optimizer that keeps a copy of the gradients it is asked to step with and changes nothing."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        self.param_groups = [{"lr": 0.0}]
        self.grads: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.policy.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.policy.zero_grad(set_to_none=set_to_none)


def tiny_policy(gradient_checkpointing: bool = False, lora: dict | None = None) -> torch.nn.Module:
    policy, _ = load_policy(config={"family": "qwen3_moe", "num_hidden_layers": LAYERS}, seed=0)
    if lora:
        torch.manual_seed(0)  # the same adapter initialisation in both arms
        policy = apply_lora(policy, lora)
    prepare_for_rl(policy, gradient_checkpointing=gradient_checkpointing)
    return policy


def synthetic_rollout() -> Rollout:
    """Left-padded prompts, right-padded responses of varied lengths, random valid routes (top-K distinct)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 20, (N, P + R), generator=gen)
    attention = torch.ones(N, P + R, dtype=torch.long)
    prompt_pad = torch.randint(0, 3, (N,), generator=gen)
    response_len = torch.randint(2, R + 1, (N,), generator=gen)
    for row in range(N):
        attention[row, : prompt_pad[row]] = 0
        attention[row, P + response_len[row] :] = 0
    ids = ids.masked_fill(attention == 0, 0)
    routes = torch.rand(N, P + R, LAYERS, EXPERTS, generator=gen).argsort(-1)[..., :K].to(torch.int8)
    return Rollout(
        input_ids=ids,
        attention_mask=attention,
        response_mask=attention[:, P:].bool(),
        prompt_len=P,
        group_size=4,
        temperature=1.0,
        rewards=torch.randn(N, generator=gen),
        advantages=torch.randn(N, generator=gen),
        routes=routes,
    )


def r3_context(policy: torch.nn.Module):
    """R3 as the routing-replay callback enters it: the micro-batch's routes replayed on the decoder."""
    decoder = policy.get_decoder()
    return lambda phase, micro: replay_routes(
        decoder, micro.routes, input_ids=micro.input_ids, prefix=micro.shared_prefix
    )


def one_step(
    compile_value, *, r3: bool, gc: bool = False, lora: dict | None = None, **settings
) -> tuple[dict, torch.Tensor, dict]:
    """(statistics, old_logp, gradients) of one learner step, two micro-batches of 4 sequences."""
    policy = tiny_policy(gradient_checkpointing=gc, lora=lora)
    optimizer = GradRecorder(policy)
    learner = Learner(
        policy,
        GRPO(),
        LearnerSettings(micro_batch_size=4, torch_compile=compile_value, **settings),
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=0.0), lambda s: 1.0),
        forward_contexts=[r3_context(policy)] if r3 else None,
    )
    rollout = synthetic_rollout()
    stats = learner.step(rollout, optimizer_step=0)
    stats = {k: v for k, v in stats.items() if not k.startswith("perf/")}
    return stats, rollout.old_logp, optimizer.grads


def assert_same_step(eager, compiled) -> None:
    (stats_e, old_e, grads_e), (stats_c, old_c, grads_c) = eager, compiled
    assert stats_e.keys() == stats_c.keys()
    for key in stats_e:
        assert stats_c[key] == pytest.approx(stats_e[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(old_c, old_e, rtol=1e-4, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 0
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's cache of compiled code is per code object (every unit's ``_call_impl``), shared by all
    ``torch.compile`` calls in the process: clear it so that this test runs its own backend's code."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("r3", [False, True], ids=["native", "r3"])
def test_compiled_update_equals_eager(r3, fresh_dynamo):
    eager = one_step(False, r3=r3)
    compiled = one_step(True, r3=r3)  # inductor, dynamic shapes
    assert_same_step(eager, compiled)
    if r3:  # the replay changed the routing, so equality above means the compiled forward replayed too
        native = one_step(False, r3=False)
        assert not torch.allclose(native[1], eager[1], atol=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        dict(gc=True, r3=True),
        dict(r3=False, track_router_shift=True),
        dict(r3=True, mini_batches=2),
        dict(r3=True, lora={"rank": 4, "router": "adapted"}),
    ],
    ids=["checkpointing-r3", "rspo-capture", "two-mini-batches-r3", "lora-adapted-router-r3"],
)
def test_compiled_update_equals_eager_with_checkpointing_capture_and_mini_batches(case):
    """aot_eager traces the same regions as inductor (the hooks question) and compiles in seconds."""
    eager = one_step(False, **case)
    compiled = one_step({"backend": "aot_eager"}, **case)
    assert_same_step(eager, compiled)
    if case.get("track_router_shift"):
        assert any(k.startswith("rspo/") for k in compiled[0])


def test_whole_compiled_layers_would_skip_the_replay_hooks():
    """Why the routers stay eager: compile a decoder layer whole, trace it once, and a replay registered
    afterwards never reaches its routers (replay_routes sees them consume its routes 0 times)."""
    policy = tiny_policy()
    for layer in policy.get_decoder().layers:
        layer.compile(backend="aot_eager", dynamic=True)
    rollout = synthetic_rollout()
    ids, mask = rollout.input_ids, rollout.attention_mask
    decoder = policy.get_decoder()

    def forward() -> None:
        decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))

    with torch.no_grad():
        forward()  # traced without hooks
        replay = replay_routes(decoder, rollout.routes)
        with pytest.raises(RuntimeError, match="consumed routes 0 times"), replay:
            forward()


def test_routers_and_their_blocks_stay_eager_and_the_rest_is_compiled():
    policy = tiny_policy()
    units = compile_units(policy)
    routers = find_moe_routers(policy)
    held = {id(m) for r in routers for m in (r.module, r.block)}
    assert not held & {id(u) for u in units}
    assert all(not any(id(m) in {id(r.module) for r in routers} for m in u.modules()) for u in units)
    layer = policy.model.layers[0]
    assert {id(layer.self_attn), id(layer.mlp.experts), id(layer.input_layernorm)} <= {id(u) for u in units}


CALLS: list[str] = []


def _counting_backend():
    """A backend whose compiled forward and backward graphs count their runs (registered once)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.registry import register_backend

    if "counting_test" not in torch._dynamo.list_backends(exclude_tags=()):

        def counting(kind):
            def compiler(gm, example_inputs):
                return lambda *args: (CALLS.append(kind), gm.forward(*args))[1]

            return compiler

        backend = aot_autograd(fw_compiler=counting("fw"), bw_compiler=counting("bw"))
        register_backend(backend, name="counting_test")
    return "counting_test"


def test_every_unit_runs_compiled_forward_and_backward_at_each_shape(fresh_dynamo):
    """Not a silent fallback to eager: each compiled submodule's graph runs once forward and once backward
    per forward, for micro-batches of other shapes too (dynamic shapes; no recompile limit reached)."""
    policy = tiny_policy()
    learner = Learner(policy, GRPO(), LearnerSettings(torch_compile={"backend": _counting_backend()}))
    units = len(learner.compiled.units)
    rollout = synthetic_rollout()
    for rows, width in ((2, 7), (3, 12), (5, 4)):
        micro = rollout.select(torch.arange(rows))
        ids, mask = micro.input_ids[:, :width], micro.attention_mask[:, :width]
        CALLS.clear()
        with learner.forward_context("update", micro):
            out = policy.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            )
            out.last_hidden_state.sum().backward()
        assert CALLS.count("fw") == units and CALLS.count("bw") == units, (rows, width)


def test_compiled_calls_are_installed_only_inside_the_learners_forward_context():
    """The rollout engine generates with the same module: outside the learner's forwards it runs eagerly."""
    policy = tiny_policy()
    learner = Learner(policy, GRPO(), LearnerSettings(torch_compile={"backend": "aot_eager"}))
    rollout = synthetic_rollout()
    unit = learner.compiled.units[0]
    assert unit._compiled_call_impl is None
    with learner.forward_context("old", rollout):
        assert unit._compiled_call_impl is not None
    with learner.forward_context("ref", rollout):  # the reference's forward is not the policy's update
        assert unit._compiled_call_impl is None
    assert unit._compiled_call_impl is None
    ids, mask = rollout.input_ids, rollout.attention_mask
    calls = []
    hook = find_moe_routers(policy)[0].module.register_forward_hook(lambda *a: calls.append(1))
    with learner.forward_context("update", rollout), torch.no_grad():
        policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    hook.remove()
    assert calls == [1]  # a hook registered after compiling still runs: the router is eager


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"mode": "max-autotun"},
            "model.torch_compile.mode: unknown 'max-autotun' (did you mean max-autotune",
        ),
        ({"backend": "inductr"}, "model.torch_compile.backend: unknown 'inductr' (did you mean inductor"),
        ({"modes": "default"}, "model.torch_compile: unknown key 'modes' (did you mean mode?)"),
        ({"dynamic": "yes"}, "model.torch_compile.dynamic: must be true, false or null, got 'yes'"),
        (
            {"backend": "eager", "mode": "max-autotune"},
            "model.torch_compile.mode: 'max-autotune' is the inductor",
        ),
        (
            "fast",
            "model.torch_compile: must be true, false or a mapping of backend, mode, dynamic; got 'fast'",
        ),
    ],
)
def test_bad_settings_are_one_line_naming_the_setting(value, message):
    with pytest.raises(SettingsError) as err:
        parse_torch_compile(value)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_settings_parse():
    assert parse_torch_compile(False) is None and parse_torch_compile(None) is None
    assert parse_torch_compile(True) == CompileSettings("inductor", "default", True)
    assert parse_torch_compile({"mode": "max-autotune", "dynamic": None}).kwargs() == {
        "backend": "inductor", "dynamic": None, "mode": "max-autotune",
    }  # fmt: skip
    assert parse_torch_compile({"backend": "aot_eager"}).kwargs() == {"backend": "aot_eager", "dynamic": True}


def test_fit_with_torch_compile_trains_and_logs(tmp_path):
    """``--model.torch_compile`` from the command line: a mapping (aot_eager keeps the test short) and R3."""
    rows = train_rows(
        run_fit(
            tmp_path,
            '--model.torch_compile={"backend": "aot_eager"}',
            "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
            "--trainer.callbacks.mode=R3",
        )
    )
    assert len(rows) == 2 and all(row["policy/grad_norm"] > 0 for row in rows)
    # the compiled forwards used the rollout's experts at every routed (token, layer)
    assert all(row["routing/rollout_train_router_disagreement"] == 0.0 for row in rows)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ('{"mode": "fastest"}', "model.torch_compile.mode: unknown 'fastest'"),
        ('{"backend": "tvmm"}', "model.torch_compile.backend: unknown 'tvmm'"),
    ],
)
def test_bad_setting_on_the_command_line_is_one_line_exit_2(capsys, tmp_path, value, needle):
    with pytest.raises(SystemExit) as exc:
        run_fit(tmp_path, f"--model.torch_compile={value}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(f"lit-moe-rl: error: {needle}")
