"""Multi-turn rollouts (issue 14): the engine keeps each trajectory's KV cache across turns, observation
tokens are appended as they were encoded and never trained, and R3 routes are exact across turns."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lit_moe_rl.policy import load_policy, position_ids_from_mask, token_logprobs
from lit_moe_rl.rollout.engine import HFEngine, generate_trajectories
from lit_moe_rl.rollout.env import Environment, env_factory
from lit_moe_rl.rollout.multiturn import TurnLimits
from lit_moe_rl.routing.record import record_routes
from lit_moe_rl.routing.replay import replay_routes

PROMPTS = ["3 5 7 => 22 =", "12 =>"]
OBS = ["= 11 =>", "= 12 =>"]


class ThreeTurns(Environment):
    """Answers every turn with a fixed text; done after the third turn; reward 1 per step."""

    stop_strings = ("=", ">")  # frequent characters: turns of a random model end by themselves

    def reset(self, sample, prompt):
        self.turn = 0
        return prompt

    def step(self, action):
        self.turn += 1
        return (OBS[self.turn - 1] if self.turn <= 2 else None), 1.0, self.turn >= 3


def _run(family="qwen3_moe", *, record=True, env=ThreeTurns, n=3, window=256, samples=None, **limits):
    torch.manual_seed(0)
    extra = {"sliding_window": window} if family == "gpt_oss" else {}
    model, tok = load_policy(config={"family": family, "vocab_size": 24} | extra)
    engine = HFEngine(max_new_tokens=20)
    engine.bind(model, tok)
    limits = (
        dict(max_turns=3, max_total_tokens=90, max_turn_tokens=20, max_env_tokens=16, env_timeout_s=5.0)
        | limits
    )
    torch.manual_seed(1)
    gen = generate_trajectories(
        engine,
        PROMPTS,
        samples or [{}, {}],
        n=n,
        make_env=env,
        limits=TurnLimits(**limits),
        record_routes=record,
    )
    return model, tok, gen


def _spans(mask_row: torch.Tensor) -> list[tuple[bool, int]]:
    """``[(sampled?, length)]`` runs of a response row's real tokens."""
    runs: list[tuple[bool, int]] = []
    for value in mask_row.tolist():
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def test_layout_is_prompt_turns_and_observations_with_loss_only_on_sampled_tokens():
    _, tok, gen = _run()
    done = [t for t in gen.trajectories if t.turns == 3]
    assert len(done) >= 4  # most trajectories ran their three turns
    real = gen.attention_mask[:, gen.prompt_len :].bool()
    for row, traj in enumerate(gen.trajectories):
        length = len(traj.tokens)
        assert real[row, :length].all() and not real[row, length:].any()
        assert torch.equal(
            gen.input_ids[row, gen.prompt_len : gen.prompt_len + length], torch.tensor(traj.tokens)
        )
        observed = ~gen.response_mask[row] & real[row]
        assert (gen.infer_logp[row][observed] == 0).all()  # μ 0 on observation tokens
        assert (gen.infer_logp[row][gen.response_mask[row]] < 0).all()
        if traj.turns == 3:  # turn | obs 1 | turn | obs 2 | turn, each observation exactly its own tokens
            spans = _spans(gen.response_mask[row][:length])
            assert [s for s, _ in spans] == [True, False, True, False, True]
            start = spans[0][1]
            obs1 = gen.input_ids[row, gen.prompt_len + start : gen.prompt_len + start + spans[1][1]]
            assert tok.decode(obs1) == OBS[0]
            assert traj.reward == 3.0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_r3_routes_over_three_turns_equal_a_full_forward_and_replay_reproduces_mu(family):
    """Every position's route comes from the forward that wrote its KV (prompt prefill, decode steps,
    observation prefills) and equals the route a full forward of the finished sequence takes; replaying
    them reproduces μ at every sampled token of every turn, with no routing disagreement."""
    model, _, gen = _run(family)
    assert sum(t.turns == 3 for t in gen.trajectories) >= 2
    ids, mask = gen.input_ids, gen.attention_mask
    positions = position_ids_from_mask(mask)
    with torch.no_grad(), record_routes(model) as rec:
        model(ids, attention_mask=mask, position_ids=positions)
    routed = gen.routes[..., 0, 0] >= 0
    assert torch.equal(routed, mask.bool())  # every real position has its route, observations included
    same = (gen.routes.sort(-1).values == rec.routes.sort(-1).values).all(-1).all(-1)
    assert bool(same[routed].all())
    with torch.no_grad(), replay_routes(model, gen.routes, input_ids=ids) as replayer:
        logp, _, _ = token_logprobs(model, ids, mask, gen.prompt_len)
    native = replayer.native_routes.sort(-1).values
    assert bool((native == gen.routes.sort(-1).values).all(-1).all(-1)[routed].all())  # disagreement 0
    sampled = gen.response_mask
    torch.testing.assert_close(logp[sampled], gen.infer_logp[sampled], rtol=0, atol=1e-5)


def test_no_turn_reprefills_history():
    """Each forward after the prompt prefill feeds a row only its new tokens: one per decode step, or the
    last sampled token plus the observation; the total fed is the response length (R3 feeds each last token)."""
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    fed: list[int] = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(int(kw["attention_mask"][:, -kw["input_ids"].shape[1] :].sum())),
        with_kwargs=True,
    )
    engine = HFEngine(max_new_tokens=20)
    engine.bind(model, tok)
    limits = TurnLimits(
        max_turns=3, max_total_tokens=90, max_turn_tokens=20, max_env_tokens=16, env_timeout_s=5.0
    )
    torch.manual_seed(1)
    gen = generate_trajectories(engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits)
    handle.remove()
    assert fed[0] == int(gen.attention_mask[::3, : gen.prompt_len].sum())  # one prefill per prompt
    assert sum(fed[1:]) == int(gen.attention_mask[:, gen.prompt_len :].sum()) - len(gen.trajectories)


class Hangs(ThreeTurns):
    def step(self, action):
        if self.turn == 1:
            time.sleep(30)
        return super().step(action)


class Raises(ThreeTurns):
    def step(self, action):
        if self.turn == 1:
            raise RuntimeError("environment bug")
        return super().step(action)


@pytest.mark.parametrize("env", [Hangs, Raises])
def test_a_hung_or_raising_environment_ends_its_trajectory_and_is_counted(env):
    start = time.monotonic()
    _, _, gen = _run(env=env, env_timeout_s=0.5, record=False)
    assert time.monotonic() - start < 20
    failed = [t for t in gen.trajectories if t.env_timeouts or t.env_errors]
    assert failed and all(t.turns == 2 and t.reward == 1.0 for t in failed)
    if env is Raises:
        assert all("environment bug" in t.errors[0] for t in failed)


def test_budget_and_observation_cut_are_enforced():
    _, _, gen = _run(max_total_tokens=14, max_env_tokens=3, record=False)
    assert all(len(t.tokens) <= 14 for t in gen.trajectories)
    assert gen.attention_mask.shape[1] - gen.prompt_len <= 14
    assert any(t.obs_cut for t in gen.trajectories)
    assert any(t.truncated for t in gen.trajectories)


def test_env_factory_reads_class_path_and_init_args():
    make = env_factory({"class_path": "tests.test_multiturn.ThreeTurns", "init_args": {}})
    assert type(make()).__name__ == "ThreeTurns" and make() is not make()  # a fresh one per trajectory
    with pytest.raises(ValueError, match="rollout.env.class_path: cannot import"):
        env_factory({"class_path": "tests.nowhere.Env"})


class CountsResets(ThreeTurns):
    resets = 0

    def reset(self, sample, prompt):
        CountsResets.resets += 1
        return super().reset(sample, prompt)


def test_a_sliding_window_the_cache_could_outgrow_is_refused_before_any_reset():
    from lit_moe_rl.rollout.multiturn import cache_columns

    limits = TurnLimits(
        max_turns=3, max_total_tokens=90, max_turn_tokens=20, max_env_tokens=16, env_timeout_s=5
    )
    assert cache_columns(limits) == 3 * (20 + 16) + 1  # holes included, whatever max_total_tokens
    with pytest.raises(ValueError, match="rollout.env: multi-turn rollouts of a sliding-window model need"):
        _run("gpt_oss", window=100, env=CountsResets, record=False)  # 109 columns after the prompt
    assert CountsResets.resets == 0
    with pytest.raises(ValueError, match=r"need sliding_window >= the KV cache's 122 columns"):
        _run("gpt_oss", window=110, env=CountsResets, record=False)  # the 13-token prompt: checked per wave
    assert CountsResets.resets == 6  # reset, then refused before any decode step
    _, _, gen = _run("gpt_oss", window=122, record=False)
    assert gen.attention_mask.shape[1] <= 122  # the bound holds: output columns never exceed the cache's


class ResetRaises(ThreeTurns):
    """Rows with ``fail`` in their sample: the first reset succeeds, the later ones fail."""

    lock, calls = threading.Lock(), 0
    stop_strings = tuple("0123456789 =>")  # almost every token ends a turn: three turns whatever is sampled

    def reset(self, sample, prompt):
        with ResetRaises.lock:
            ResetRaises.calls += sample.get("fail", 0)
            fails = sample.get("fail", 0) and ResetRaises.calls > 1
        if fails:
            self.fail()
        return super().reset(sample, prompt)

    def fail(self):
        raise RuntimeError("reset bug")


class ResetHangs(ResetRaises):
    def fail(self):
        time.sleep(60)


@pytest.mark.parametrize("env", [ResetRaises, ResetHangs])
def test_a_failing_reset_ends_that_trajectory_scored_zero_and_the_run_goes_on(env):
    from lit_moe_rl.callbacks.multiturn import multiturn_metrics

    ResetRaises.calls = 0
    start = time.monotonic()
    _, _, gen = _run(env=env, env_timeout_s=1.0, record=True, samples=[{"fail": 1}, {}])
    assert time.monotonic() - start < 20  # the hung reset gets the per-step deadline
    failed = [t.reset_failed for t in gen.trajectories]
    assert sum(failed[:3]) == 2 and not any(failed[3:])  # one reset of the first group succeeded
    for traj in gen.trajectories:
        if traj.reset_failed:
            assert traj.reward == 0.0 and traj.turns == 1 and traj.ended and all(traj.sampled)
            assert (traj.env_timeouts, traj.env_errors) == ((1, 0) if env is ResetHangs else (0, 1))
            assert "reset()" in traj.errors[0]
        else:
            assert traj.turns == 3 and traj.reward == 3.0
    metrics = multiturn_metrics(gen)
    assert metrics["multiturn/env_errors" if env is ResetRaises else "multiturn/env_timeouts"] == 2.0
    assert torch.equal(gen.routes[..., 0, 0] >= 0, gen.attention_mask.bool())  # R3 routes every real token


QWEN_LIKE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
DROPS_THINK = (  # Qwen3's stock behaviour: earlier turns lose their <think> block
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last %}{%- set c = c.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_tokenizer(template: str = QWEN_LIKE):
    """The character tokenizer with letters, ``<|im_start|>``/``<|im_end|>`` and a chat template."""
    from lit_moe_rl.policy import CHAR_ALPHABET, char_tokenizer

    tok = char_tokenizer(CHAR_ALPHABET + "abcdefghijklmnopqrstuvwxyz\n,.:_{}\"'<>|")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    tok.padding_side = "left"
    return tok


def test_template_probe_accepts_a_prefix_preserving_template_and_refuses_one_that_drops_think():
    from lit_moe_rl.rollout.observations import check_template

    assert check_template(chat_tokenizer()) == "<|im_end|>\n"
    with pytest.raises(
        ValueError, match="chat template is not prefix-preserving .*rendering a second turn changed"
    ):
        check_template(chat_tokenizer(DROPS_THINK))


def test_observation_suffix_owns_the_template_tokens_at_the_turn_boundary():
    """After a turn that sampled ``...<|im_end|>``, the ``\\n`` the template adds and the next role headers
    are observation tokens; after a stop string, the whole ``<|im_end|>\\n`` is."""
    from lit_moe_rl.rollout.observations import ObservationEncoder

    tok = chat_tokenizer()
    enc = ObservationEncoder(tok, chat=True)
    conversation = enc.start([{"role": "user", "content": "hi"}])
    ids = enc.encode(conversation, "ok", "<|im_end|>", "more")
    assert tok.decode(ids) == "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    ids = enc.encode(conversation, "<call>", "", [{"role": "tool", "content": "4"}])
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert full.endswith("<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n")


def test_chat_trajectories_train_only_sampled_tokens_and_refuse_a_bad_template():
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model, _ = load_policy(config={"family": "qwen3_moe", "vocab_size": len(tok)})
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    engine = HFEngine(max_new_tokens=30)
    engine.bind(model, tok)
    limits = TurnLimits(
        max_turns=3, max_total_tokens=200, max_turn_tokens=30, max_env_tokens=40, env_timeout_s=5.0
    )

    class Chat(ThreeTurns):
        stop_strings = tuple("aeiou0123456789")

    prompt = [{"role": "user", "content": "hi"}]
    gen = generate_trajectories(engine, [prompt], [{}], n=4, make_env=Chat, limits=limits)
    assert any(traj.turns >= 2 for traj in gen.trajectories)
    for row, traj in enumerate(gen.trajectories):
        if traj.turns < 2:
            continue
        spans = _spans(gen.response_mask[row][: len(traj.tokens)])
        first_obs = gen.input_ids[row, gen.prompt_len + spans[0][1] :][: spans[1][1]]
        assert tok.decode(first_obs).startswith("<|im_end|>\n<|im_start|>user\n= 11 =>")
    engine.tokenizer = chat_tokenizer(DROPS_THINK)
    with pytest.raises(ValueError, match="not prefix-preserving"):
        generate_trajectories(engine, [prompt], [{}], n=2, make_env=Chat, limits=limits)


# ------------------------------------------------------------------ through the trainer


def transcript_reward(completion: str, sample: dict) -> float:
    """A reward a random model earns sometimes: the transcript's length modulo 3 (scores whole transcripts)."""
    return float(len(completion) % 3)


def _fit(tmp_path, *extra, steps=2):
    from tests.helpers import read_metrics, run_fit

    args = [
        "--rollout.env={class_path: lit_moe_rl.envs.countdown.MultiTurnCountdown}",
        '--model.config={"family": "qwen3_moe", "vocab_size": 24}',  # EOS is likely: turns end by themselves
        "--rollout.engine.max_new_tokens=24",
        "--rollout.max_total_tokens=60",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        *extra,
    ]
    return read_metrics(run_fit(tmp_path, *args, steps=steps))


@pytest.mark.parametrize("algorithm", ["GRPO", "DAPO", "DrGRPO", "GSPO", "GMPO", "RSPO"])
def test_every_algorithm_trains_on_multi_turn_rollouts(algorithm, tmp_path):
    rows = _fit(
        tmp_path,
        f"--model.algorithm=lit_moe_rl.algorithms.{algorithm}",
        "--rollout.reward=tests.test_multiturn.transcript_reward",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    assert rows
    assert all(float(r["multiturn/turns"]) > 0 for r in rows)
    assert any(float(r["multiturn/obs_token_share"]) > 0 for r in rows)
    assert any(float(r["policy/grad_norm"]) > 0 for r in rows)  # sampled tokens carried a loss


def test_r3_fit_on_multi_turn_rollouts_replays_with_no_disagreement(tmp_path):
    from tests.helpers import ROOT

    rows = _fit(
        tmp_path,
        "--rollout.reward=tests.test_multiturn.transcript_reward",
        f"--trainer.callbacks+={ROOT / 'callbacks' / 'routing_replay.yaml'}",
    )
    assert rows and any(float(r["multiturn/obs_token_share"]) > 0 for r in rows)
    for row in rows:
        assert float(row["routing/rollout_train_router_disagreement"]) == 0.0  # same-dtype engine, replayed
        assert float(row["routing/fallback_real_tokens"]) == 0.0  # observations too have their routes


def test_trim_padding_keeps_observation_columns_and_dr_grpo_uses_the_trajectory_budget():
    from lit_moe_rl.batch import Rollout
    from lit_moe_rl.callbacks.rollout import RolloutCallback
    from lit_moe_rl.learner.batching import trim_padding

    sampled = torch.tensor(
        [[True, False, False, False, False, False], [True, True, False, True, False, False]]
    )
    real = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # row 1 ends with an observation token
    micro = Rollout(
        input_ids=torch.ones(2, 8, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(2, 2, dtype=torch.long), real], 1),
        response_mask=sampled,
        prompt_len=2,
        group_size=2,
        temperature=1.0,
        rewards=torch.zeros(2),
        advantages=torch.zeros(2),
    )
    trimmed = trim_padding(micro)
    assert trimmed.response_len == 5 and trimmed.input_ids.shape[1] == 7  # up to the last attended column
    callback = RolloutCallback(
        engine=HFEngine(max_new_tokens=8), env={"class_path": "lit_moe_rl.envs.countdown.MultiTurnCountdown"}
    )
    assert callback.max_response_len() == 3 * 8  # max_turns x max_new_tokens unless max_total_tokens is set
    assert RolloutCallback(engine=HFEngine(max_new_tokens=8)).max_response_len() == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_turns": 0}, "rollout.max_turns: must be >= 1, got 0"),
        ({"max_env_tokens": 0}, "rollout.max_env_tokens: must be >= 1, got 0"),
        ({"env_timeout_s": 0.0}, "rollout.env_timeout_s: must be > 0, got 0.0"),
        ({"max_total_tokens": 0}, "rollout.max_total_tokens: must be >= 1, got 0"),
        ({"seed_per_prompt": True}, "rollout.seed_per_prompt: not supported with rollout.env"),
        ({"max_batch_tokens": 0}, "rollout.max_batch_tokens: must be >= 1 and needs the HFEngine, got 0"),
        ({"env_isolation": "fork"}, "rollout.env_isolation: expected auto, process or thread, got 'fork'"),
        ({"env_workers": 0}, "rollout.env_workers: must be >= 1, got 0"),
    ],
)
def test_multi_turn_settings_are_checked_at_construction(kwargs, message):
    from lit_moe_rl.callbacks.rollout import RolloutCallback

    with pytest.raises(ValueError, match=message):
        RolloutCallback(env={"class_path": "lit_moe_rl.envs.countdown.MultiTurnCountdown"}, **kwargs)


# ------------------------------------------------------------------ what users see


def _cli_error(capsys, tmp_path, *extra: str) -> str:
    from tests.helpers import run_fit

    with pytest.raises(SystemExit) as exc:
        run_fit(tmp_path, *extra)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("lit-moe-rl: error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


ENV = '--rollout.env={"class_path": "lit_moe_rl.envs.countdown.MultiTurnCountdown"}'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([ENV, "--rollout.max_turns=0"], "rollout.max_turns: must be >= 1, got 0"),
        ([ENV, "--rollout.env_timeout_s=0"], "rollout.env_timeout_s: must be > 0, got 0.0"),
        (
            ['--rollout.env={"class_path": "no_such.Env"}'],
            "rollout.env.class_path: cannot import 'no_such.Env'",
        ),
        ([ENV, "--rollout.seed_per_prompt=true"], "rollout.seed_per_prompt: not supported with rollout.env"),
    ],
)
def test_bad_multi_turn_settings_print_one_line(capsys, tmp_path, extra, message):
    assert message in _cli_error(capsys, tmp_path, *extra)


def test_a_template_that_is_not_prefix_preserving_is_refused_at_start_up(capsys, tmp_path):
    chat_tokenizer(DROPS_THINK).save_pretrained(tmp_path / "tok")
    line = _cli_error(
        capsys,
        tmp_path,
        ENV,
        f"--model.tokenizer={tmp_path / 'tok'}",
        '--model.config={"family": "qwen3_moe", "vocab_size": 128}',
    )
    assert "rollout.env: the tokenizer's chat template is not prefix-preserving" in line


def test_bench_counts_fewer_prefilled_tokens_for_the_same_trajectories():
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_multiturn", ROOT / "bench" / "multiturn.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--rows", "4", "--repeats", "1", "--obs", "8"])
    assert out["turns_per_trajectory"] > 2
    assert out["engine_decode_tokens"] == out["reprefill_decode_tokens"]  # the same tokens, decoded alike
    assert out["prefill_ratio"] > 1.5  # history is prefilled again every turn by the other loop


def test_the_multi_turn_loop_reads_the_device_once_per_step():
    from tests.test_engine_decode import _DeviceReads

    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    engine = HFEngine(max_new_tokens=20)
    engine.bind(model, tok)
    limits = TurnLimits(
        max_turns=3, max_total_tokens=90, max_turn_tokens=20, max_env_tokens=16, env_timeout_s=5.0
    )
    prefills = []  # forwards of more than one column: the prompts, then each round's observation chunk
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: prefills.append(1) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    torch.manual_seed(1)
    with _DeviceReads(model) as reads:
        gen = generate_trajectories(engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits)
    for handle in [*reads.handles, hook]:
        handle.remove()
    assert sum(t.turns for t in gen.trajectories) >= 12 and reads.steps >= 10 and len(prefills) >= 3
    # one per step, two at the start, and each prefill's index of real tokens (host-side masks: counted
    # here, no device read)
    assert reads.reads <= reads.steps + 2 + len(prefills)


def test_readme_multi_turn_commands_run_shortened(tmp_path, monkeypatch):
    """README's multi-turn block: the Countdown config, the calculator tokenizer and config, the bench."""
    import shlex
    import subprocess
    import sys

    from lit_moe_rl.cli import main
    from tests.helpers import ROOT
    from tests.test_readme import _commands

    commands = [c for c in _commands() if "multiturn" in c or "calculator" in c]
    assert len(commands) == 4
    monkeypatch.chdir(tmp_path)  # relative outputs (runs/...) land here
    for link in ("configs", "examples", "bench"):
        (tmp_path / link).symlink_to(ROOT / link)
    short = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--data.num_val=8",
             "--data.val_batch_size=8", "--trainer.enable_progress_bar=false"]  # fmt: skip
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "lit-moe-rl":
            main([*argv[1:], *short])
        else:
            extra = ["--rows", "2", "--repeats", "1"] if "bench" in argv[1] else []
            done = subprocess.run([sys.executable, *argv[1:], *extra], capture_output=True, text=True, timeout=300,
                                  env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "calculator_tokenizer" / "tokenizer_config.json").exists()


class Crashes(ThreeTurns):
    """Kills its own process at its second step (a segfault would do the same)."""

    def step(self, action):
        if self.turn == 1:
            import os

            os._exit(3)
        return super().step(action)


@pytest.mark.parametrize("env", ["Hangs", "Crashes", "Raises"])
def test_environments_in_worker_processes_survive_a_hung_or_crashing_one(env):
    from lit_moe_rl.rollout.env_workers import EnvPool

    pool = EnvPool({"class_path": f"tests.test_multiturn.{env}"}, num_workers=2)
    try:
        start = time.monotonic()
        _, _, gen = _run(env=pool, env_timeout_s=2.0, record=False)
        assert time.monotonic() - start < 30
        failed = [t for t in gen.trajectories if t.env_timeouts or t.env_errors]
        # the failing step ends its trajectory, scored with the steps before it; trajectories that shared
        # a replaced worker lose their environment and end the same way at their next step
        assert any(t.turns == 2 for t in failed) and all(t.reward == t.turns - 1 for t in failed)
        assert all(t.env.metrics() == {} for t in gen.trajectories)
        _, _, again = _run(env=pool, record=False)  # the replaced workers serve the next rollout
        assert sum(t.reward for t in again.trajectories) >= 3
    finally:
        pool.close()
    assert pool.workers == []


def test_env_isolation_auto_picks_threads_for_thread_safe_environments_and_processes_otherwise():
    from lit_moe_rl.callbacks.rollout import RolloutCallback
    from lit_moe_rl.rollout.env_workers import EnvPool

    countdown = RolloutCallback(env={"class_path": "lit_moe_rl.envs.countdown.MultiTurnCountdown"})
    assert not isinstance(countdown.multiturn.make_env, EnvPool)
    tools = RolloutCallback(env={"class_path": "tests.test_multiturn.ThreeTurns"})
    assert isinstance(tools.multiturn.make_env, EnvPool)  # nothing started until the first rollout
    assert tools.multiturn.make_env.workers == []


# ------------------------------------------------------------------ the KV budget (item 9)


class _CacheSlots:
    """The largest ``rows x cache columns`` any decoder call of the engine saw."""

    def __init__(self, model):
        self.peak = self.prefills = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, _args, kwargs):
        mask = kwargs["attention_mask"]
        self.peak = max(self.peak, mask.shape[0] * mask.shape[1])
        self.prefills += kwargs["input_ids"].shape[1] > 1  # one prompt prefill per wave


@pytest.mark.parametrize("budget", [None, 10_000, 200])
def test_max_batch_tokens_runs_waves_that_bound_the_kv_cache(budget):
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    prompts = ["3 5 7 => 22 =", "1 2 => 3 =", "12 =>", "4 4 => 16 ="]
    free = HFEngine(max_new_tokens=12)
    free.bind(model, tok)
    reference = free.generate(prompts, n=3, greedy=True, record_routes=True)
    engine = HFEngine(max_new_tokens=12, max_batch_tokens=budget)
    engine.bind(model, tok)
    slots = _CacheSlots(model)
    gen = engine.generate(prompts, n=3, greedy=True, record_routes=True)
    slots.handle.remove()
    if budget is not None:
        assert slots.peak <= budget
    assert slots.prefills == {None: 1, 10_000: 1, 200: 2}[budget]  # 200: two waves of two prompts
    # greedy rows do not depend on their batch: the merged waves are the one-batch output
    real = reference.attention_mask.bool()
    assert torch.equal(gen.attention_mask.sum(-1), reference.attention_mask.sum(-1))
    assert torch.equal(gen.response_mask, reference.response_mask)
    for row in range(gen.input_ids.shape[0]):
        ours = gen.input_ids[row][gen.attention_mask[row].bool()]
        assert torch.equal(ours, reference.input_ids[row][real[row]])
        routed = gen.routes[row][gen.attention_mask[row].bool()]
        assert torch.equal(routed.sort(-1).values, reference.routes[row][real[row]].sort(-1).values)


def test_max_batch_tokens_waves_multi_turn_trajectories_and_refuses_a_budget_below_one_prompt():
    _, _, gen = _run(max_total_tokens=60, record=True)
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    engine = HFEngine(
        max_new_tokens=20, max_batch_tokens=3 * (14 + 3 * (20 + 16) + 1)
    )  # one prompt, holes included
    engine.bind(model, tok)
    limits = TurnLimits(
        max_turns=3, max_total_tokens=60, max_turn_tokens=20, max_env_tokens=16, env_timeout_s=5.0
    )
    torch.manual_seed(1)
    waved = generate_trajectories(
        engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits, record_routes=True
    )
    assert len(waved.trajectories) == 6 and waved.routes.shape[:2] == waved.input_ids.shape
    assert torch.equal((waved.routes[..., 0, 0] >= 0), waved.attention_mask.bool())
    slots = _CacheSlots(model)
    generate_trajectories(engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits)
    slots.handle.remove()
    assert slots.peak <= engine.max_batch_tokens  # the masked hole columns are counted
    engine.max_batch_tokens = 3 * (14 + 60)  # enough for real tokens only: the holes would not fit
    with pytest.raises(ValueError, match="rollout.max_batch_tokens: 222 is less than one prompt's 3 rows"):
        generate_trajectories(engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits)


def test_validation_logs_held_out_multi_turn_metrics_and_samples_mark_observations(tmp_path):
    from tests.helpers import ROOT

    rows = _fit(
        tmp_path,
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1",
        "--trainer.num_sanity_val_steps=-1",
        "--rollout.reward=null",
        f"--trainer.callbacks+={ROOT / 'callbacks' / 'samples.yaml'}",
        "--trainer.callbacks.every_n_steps=1",
    )
    val = [r for r in rows if r.get("val/multiturn/turns")]
    assert val and all(0.0 <= float(r["val/multiturn/env/solved"]) <= 1.0 for r in val)
    assert val[0]["step"] == "0" and len(val) >= 2  # before training (the sanity check) and after steps
    import glob
    import json
    from pathlib import Path

    files = glob.glob(str(tmp_path / "**" / "samples.jsonl"), recursive=True)
    samples = [json.loads(line) for f in files for line in Path(f).read_text().splitlines()]
    assert samples and any("⟦" in s["completion"] and "⟧" in s["completion"] for s in samples)


# ------------------------------------------------------------------ the warm start on transcripts


def test_synthetic_transcripts_are_a_wrong_attempt_its_feedback_and_the_solution():
    import random

    from lit_moe_rl.envs.countdown import MultiTurnCountdown, synthetic_transcript

    sample = {"numbers": [3, 5, 7], "target": 22}
    parts = synthetic_transcript(sample, "3*5+7", random.Random(0))
    (attempt, a), (feedback, f), (solution, s) = parts
    assert (a, f, s) == (False, False, True) and solution == "3*5+7"
    env = MultiTurnCountdown()
    env.reset(sample, "")
    value = env.value(attempt)
    assert value is not None and value != 22 and feedback == f" = {value} => 22 ="


def test_sft_loss_covers_only_the_solution_after_a_wrong_attempt():
    from lit_moe_rl.sft import SFTModule

    module = SFTModule(config={"family": "qwen3_moe", "vocab_size": 32}, multiturn_fraction=1.0)
    module.configure_model()
    tok = module.tokenizer
    ids, attn, loss = module.encode_segments(
        ["1 2 => 3 ="], [[("1-2", False), (" = -1 => 3 =", False), ("1+2", True)]]
    )
    text = "1 2 => 3 =" + "1-2" + "<eos>" + " = -1 => 3 =" + "1+2" + "<eos>"
    assert tok.decode(ids[0]) == text and attn.all()
    assert tok.decode(ids[0][loss[0].bool()]) == "1+2<eos>"
    with pytest.raises(ValueError, match=r"model.multiturn_fraction: must be in \[0, 1\], got 1.5"):
        SFTModule(config={"family": "qwen3_moe"}, multiturn_fraction=1.5)


def test_multi_turn_warm_start_config_runs_shortened(tmp_path, monkeypatch):
    from lit_moe_rl.cli import main
    from tests.helpers import ROOT

    monkeypatch.chdir(tmp_path)
    main(["sft", f"--config={ROOT / 'configs' / 'multiturn_countdown_sft.yaml'}", "--trainer.max_steps=2",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert (tmp_path / "runs" / "multiturn_warm_start" / "config.json").exists()


def test_two_ddp_ranks_run_multi_turn_rollouts_with_r3_and_validation(tmp_path):
    """2 gloo processes: each rank runs its own trajectories (environments in worker processes), replays
    their routes, validates and steps together."""
    from tests.test_distributed_e2e import R3, fit

    rows, _ = fit(
        tmp_path, "--trainer.strategy=ddp", "--rollout.seed_per_prompt=false",
        '--rollout.env={"class_path": "tests.test_multiturn.ThreeTurns"}', "--rollout.reward=null",
        "--rollout.engine.max_new_tokens=20", "--rollout.max_total_tokens=60", *R3,
        "--data.num_val=4", "--data.val_batch_size=2", "--trainer.limit_val_batches=null",
        "--trainer.num_sanity_val_steps=-1", devices=2, batch_size=2, steps=2,
    )  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        assert row["multiturn/turns"] > 1 and row["routing/rollout_train_router_disagreement"] == 0.0
        assert row["policy/grad_norm"] > 0


def test_readme_ten_line_environment_works():
    import re

    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "class Guess" in b]
    namespace: dict = {}
    exec(block, namespace)
    env = namespace["Guess"]()
    assert env.reset({"answer": 7}, "q") == "q"
    assert env.step("5")[1:] == (0.0, False) and env.step(" 7 ") == (None, 1.0, True)


def test_nan_probabilities_stop_a_multi_turn_rollout_in_one_line_without_reaching_multinomial():
    from lit_moe_rl.rollout.sampling import NonFiniteProbabilities, SamplingParams, sample_step_flagged

    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    torch.manual_seed(0)
    tokens, _, bad = sample_step_flagged(logits, SamplingParams())
    assert bad.tolist() == [False, True] and tokens.shape == (2,)  # the NaN row never reached multinomial
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    with torch.no_grad():
        model.get_output_embeddings().weight[5].fill_(float("nan"))
    engine = HFEngine(max_new_tokens=8)
    engine.bind(model, tok)
    limits = TurnLimits(
        max_turns=3, max_total_tokens=30, max_turn_tokens=8, max_env_tokens=8, env_timeout_s=5.0
    )
    with pytest.raises(NonFiniteProbabilities, match="NaN or inf in 6 of 6 rows"):
        generate_trajectories(engine, PROMPTS, [{}, {}], n=3, make_env=ThreeTurns, limits=limits)


def test_environment_threads_are_reused_and_a_hung_one_is_left_alone():
    from lit_moe_rl.rollout.env_runner import run_concurrently

    def workers():
        return sum(t.name == "lit-moe-rl-env" for t in threading.enumerate())

    start = workers()
    for _ in range(6):
        assert run_concurrently([lambda i=i: i for i in range(8)], 5.0) == [("ok", i) for i in range(8)]
        time.sleep(0.05)  # the threads return to the idle list after answering
    assert workers() - start <= 8  # 48 calls, at most 8 at once: threads are reused, not one per call
    release = threading.Event()
    hung = run_concurrently([release.wait, lambda: 1 / 0, lambda: "fine"], 0.3)
    assert hung == [("timeout", None), ("error", "ZeroDivisionError: division by zero"), ("ok", "fine")]
    assert (
        run_concurrently([lambda: "next"] * 3, 5.0) == [("ok", "next")] * 3
    )  # not queued behind the hung one
    release.set()


def test_a_failing_reset_in_a_worker_process_ends_that_trajectory_only():
    from lit_moe_rl.rollout.env_workers import EnvPool

    pool = EnvPool({"class_path": "tests.test_multiturn.ResetRaises"}, num_workers=2)
    try:  # worker 0 resets trajectories 0, 2, 4 in turn and fails its second "fail" row: trajectory 2
        _, _, gen = _run(env=pool, env_timeout_s=5.0, record=False, samples=[{"fail": 1}, {}])
    finally:
        pool.close()
    assert [t.reset_failed for t in gen.trajectories] == [False, False, True, False, False, False]
    failed = gen.trajectories[2]
    assert failed.reward == 0.0 and failed.env_errors == 1 and "reset bug" in failed.errors[0]
    assert all(t.reward == 3.0 for i, t in enumerate(gen.trajectories) if i != 2)


class _AlwaysOne:
    thread_safe = True

    def __call__(self, text, sample):
        return 1.0


def test_a_trajectory_whose_reset_failed_scores_zero_under_a_transcript_reward():
    from types import SimpleNamespace

    from lit_moe_rl.callbacks.rollout import RolloutCallback

    callback = RolloutCallback(
        env={"class_path": "tests.test_multiturn.ThreeTurns"}, reward=_AlwaysOne(), group_size=2
    )
    trajs = [
        SimpleNamespace(reset_failed=f, env_errors=int(f), env_timeouts=0)
        for f in (False, True, False, False)
    ]
    rewards, errors = callback._rewards(SimpleNamespace(trajectories=trajs), ["a"] * 4, [{}, {}], 2)
    assert rewards.tolist() == [1.0, 0.0, 1.0, 1.0] and errors == 0
