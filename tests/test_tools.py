"""The tool environment (issue 14 item 1) and the calculator example (item 6): Qwen3-style tool calls,
errors returned to the model, the turn stopping at ``</tool_call>`` so nothing after it is trained."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lit_moe_rl.envs.tools import ToolEnv, parse_tool_call, tool_schema
from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout import multiturn
from lit_moe_rl.rollout.engine import HFEngine, generate_trajectories
from lit_moe_rl.rollout.multiturn import TurnLimits
from tests.helpers import ROOT, latest_metrics, read_metrics

sys.path.insert(0, str(ROOT / "examples" / "calculator"))
from calculator import CalculatorEnv, calculate  # noqa: E402
from tokenizer import build as build_tokenizer  # noqa: E402


def divide(a: int, b: int = 1) -> float:
    """Divide two numbers.

    Args:
        a: The numerator.
        b: The denominator.
    """
    return a / b


def test_schema_comes_from_the_signature_and_docstring():
    assert tool_schema(divide) == {
        "type": "function",
        "function": {
            "name": "divide",
            "description": "Divide two numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The numerator."},
                    "b": {"type": "integer", "description": "The denominator."},
                },
                "required": ["a"],
            },
        },
    }


def _call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_calls_errors_and_the_final_answer():
    env = ToolEnv([divide, calculate])
    env.reset({}, "q")
    assert env.step(_call("divide", a=6, b=3)) == ([{"role": "tool", "content": "2.0"}], 0.0, False)
    bad = [
        ("<tool_call>{not json</tool_call>", "Error: the tool call is not valid JSON"),
        (_call("nope"), "Error: unknown tool 'nope'"),
        (_call("divide", a=1, b=0), "Error: ZeroDivisionError"),
        (_call("divide", c=1), "Error: TypeError"),
        ('<tool_call>{"name": "divide", "arguments": [1]}</tool_call>', "Error: the tool call's arguments"),
    ]
    for action, error in bad:
        observation, reward, done = env.step(action)
        assert observation[0]["content"].startswith(error) and not done
    assert env.step("the answer is 2") == (None, 0.0, True)
    assert parse_tool_call("no call") is None


def test_reset_lists_the_tools_in_a_system_message():
    env = ToolEnv([divide], system="Be brief.")
    messages = env.reset({}, "What is 6/3?")
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert json.dumps(tool_schema(divide)) in messages[0]["content"]
    assert messages[1:] == [{"role": "user", "content": "What is 6/3?"}]


def test_a_turn_stops_at_the_tool_call_end_and_its_result_is_an_observation(monkeypatch):
    """Scripted sampling: turn 1 writes a call followed by junk, turn 2 the answer. The junk is never
    sampled, the tool's result comes back as observation tokens, the reward scores the final answer."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    model, _ = load_policy(config={"family": "qwen3_moe", "vocab_size": 128, "max_position_embeddings": 2048})
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    engine = HFEngine(max_new_tokens=120)
    engine.bind(model, tok)
    turns = [
        tok(_call("calculate", expression="12*34") + "JUNK", add_special_tokens=False)["input_ids"],
        tok("It is 408", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")],
    ]
    envs: list[CalculatorEnv] = []

    def scripted(logits, params):
        env = envs[0]
        turn = turns[env.calls]
        position = scripted.counts.get(env.calls, 0)
        scripted.counts[env.calls] = position + 1
        return torch.tensor([turn[position]]), torch.tensor([-0.5]), torch.tensor([False])

    scripted.counts = {}
    monkeypatch.setattr(multiturn, "sample_step_flagged", scripted)

    def make():
        envs.append(CalculatorEnv())
        return envs[-1]

    limits = TurnLimits(
        max_turns=3, max_total_tokens=300, max_turn_tokens=120, max_env_tokens=80, env_timeout_s=5.0
    )
    gen = generate_trajectories(
        engine, ["What is 12*34?"], [{"answer": 408}], n=1, make_env=make, limits=limits
    )
    traj = gen.trajectories[0]
    assert traj.turns == 2 and traj.reward == 1.0
    response = gen.input_ids[0, gen.prompt_len :]
    sampled = tok.decode(response[gen.response_mask[0]])
    observed = tok.decode(response[~gen.response_mask[0]])
    assert sampled == _call("calculate", expression="12*34") + "It is 408<|im_end|>"
    assert "JUNK" not in tok.decode(response)
    assert observed == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_calculator_example_trains(tmp_path, monkeypatch):
    """examples/calculator/config.yaml with its chat tokenizer built here: a tool environment end to end."""
    from lit_moe_rl.cli import main

    monkeypatch.chdir(ROOT)
    build_tokenizer(str(tmp_path / "tok"))
    main(
        [
            "fit",
            "--config=examples/calculator/config.yaml",
            f"--model.tokenizer={tmp_path / 'tok'}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    rows = [r for r in read_metrics(latest_metrics(tmp_path)) if r.get("multiturn/turns")]
    assert len(rows) == 2 and all(float(r["multiturn/env_errors"]) == 0 for r in rows)


@pytest.mark.parametrize("expression", ["1+", "2**99999"])
def test_the_calculator_tool_raises_on_bad_expressions_and_the_env_says_so(expression):
    env = CalculatorEnv()
    env.reset({"answer": 1}, "q")
    observation, _, done = env.step(_call("calculate", expression=expression))
    assert observation[0]["content"].startswith("Error: ") and not done
