"""Rewards: TinyZero Countdown rules, the safe evaluator, the batch scorer, the registry, math-verify."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from lit_moe_rl.rewards import CountdownReward, MathReward, RewardFn, resolve_reward, score_batch
from lit_moe_rl.rewards.arith import ArithError, safe_eval

SAMPLE = {"numbers": [3, 5, 7], "target": 22}


def tags(line: str, think: str = "3*5 is 15, plus 7 is 22") -> str:
    """A response to the TinyZero prompt whose last line is ``line``."""
    return f"{think}</think>\n{line}"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (tags("<answer>3*5+7</answer>"), 1.0),
        (tags("<answer> (3 * 5) + 7 </answer>"), 1.0),
        (tags("<answer>3*5-7</answer>"), 0.1),  # wrong value
        (tags("<answer>3*5+8</answer>"), 0.1),  # wrong numbers
        (tags("<answer>3*5</answer>"), 0.1),  # a number unused
        (tags("<answer>3*5+7+7</answer>"), 0.1),  # a number used twice
        (tags("the answer is 22"), 0.0),  # no answer tag
        ("<answer>3*5\n+7</answer>", 0.0),  # split over lines: only the last line counts
        (tags("<answer>1+2</answer> then <answer>3*5+7</answer>"), 1.0),  # the last answer is used
        (tags("<answer>3*5+7</answer> then <answer>1+2</answer>"), 0.1),
        (tags("<answer>3x5+7</answer>"), 0.1),  # disallowed character
        (tags("<answer>3*5+7=22</answer>"), 0.1),  # '=' is not allowed (and 22 is an extra number)
        (tags("<answer>3*(5+7</answer>"), 0.1),  # syntax error
    ],
)
def test_countdown_tags_rules(completion: str, expected: float) -> None:
    assert CountdownReward()(completion, SAMPLE) == pytest.approx(expected)


def test_countdown_tags_trailing_line_after_answer_scores_zero() -> None:
    # TinyZero keeps only the last line: anything after the answer line hides it.
    assert CountdownReward()(tags("<answer>3*5+7</answer>") + "\n", SAMPLE) == 0.0


def test_countdown_tags_cuts_after_marker() -> None:
    full = "User: use <answer>1</answer>\nAssistant: Let me solve this.\n<think>ok</think>\n<answer>3*5+7</answer>"
    assert CountdownReward()(full, SAMPLE) == 1.0
    chat = "<|im_start|>user\n<answer>x</answer><|im_end|>\n<|im_start|>assistant\n<answer>7+5*3</answer>"
    assert CountdownReward()(chat, SAMPLE) == 1.0


def test_countdown_never_evaluates_code() -> None:
    sample = {"numbers": [], "target": 0}
    completion = tags("<answer>__import__('os').system('exit 1')</answer>")
    assert CountdownReward()(completion, sample) == 0.1
    with pytest.raises(ArithError):
        safe_eval("__import__('os').system('exit 1')")


def test_countdown_non_integer_intermediate_equal_to_target() -> None:
    sample = {"numbers": [3, 4, 6], "target": 8}
    assert CountdownReward()(tags("<answer>4/3*6</answer>"), sample) == 1.0
    assert CountdownReward()(tags("<answer>7/2</answer>"), {"numbers": [7, 2], "target": 3}) == 0.1


def test_countdown_division_by_zero_is_format_score() -> None:
    assert CountdownReward()(tags("<answer>3/(5-5)</answer>"), {"numbers": [3, 5, 5], "target": 1}) == 0.1


def test_countdown_custom_scores() -> None:
    fn = CountdownReward(format_score=0.0, score=2.0)
    assert fn(tags("<answer>3*5+7</answer>"), SAMPLE) == 2.0
    assert fn(tags("<answer>3*5-7</answer>"), SAMPLE) == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3*5+7", 1.0),
        (" 3*5+7 \nrubbish", 1.0),  # first line only, stripped
        ("(7+3*5)", 1.0),
        ("3*5-7", 0.1),
        ("3*5+8", 0.1),
        ("3*5+", 0.1),  # syntax error
        ("", 0.0),
        ("\n3*5+7", 0.0),  # empty first line
        ("3 5 7 => 22", 0.0),  # disallowed characters
        ("<answer>3*5+7</answer>", 0.0),
    ],
)
def test_countdown_plain(completion: str, expected: float) -> None:
    assert CountdownReward(format="plain")(completion, SAMPLE) == pytest.approx(expected)


def test_countdown_bad_format_and_missing_field() -> None:
    with pytest.raises(ValueError, match="reward.format"):
        CountdownReward(format="xml")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="numbers"):
        CountdownReward(format="plain")("3*5+7", {"target": 22})


@pytest.mark.parametrize(
    ("expr", "value"),
    [("3*5+7", 22.0), ("(1 + 2) / 3", 1.0), ("-3+ +4", 1.0), ("7/2", 3.5), ("2.5*2", 5.0), ("10-2-3", 5.0)],
)
def test_safe_eval_values(expr: str, value: float) -> None:
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "2**3",
        "7//2",
        "7%2",
        "x+1",
        "abs(-1)",
        "(1).real",
        "[1]",
        "True+1",
        "'a'",
        "1/0",
        "1/(2-2)",
        "9" * 13,
        "999999*999999*999999",
        "1e400",
        "1+" * 150 + "1",
        "3*",
        "",
    ],
)
def test_safe_eval_rejects(expr: str) -> None:
    with pytest.raises(ArithError):
        safe_eval(expr)


def _raise_on_odd(completion: str, sample: dict) -> float:
    if sample["i"] % 2:
        raise RuntimeError("boom")
    return 1.0


def test_score_batch_errors_score_zero(caplog: pytest.LogCaptureFixture) -> None:
    samples = [{"i": i} for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="lit_moe_rl.rewards.base"):
        scores, errors = score_batch(_raise_on_odd, ["c"] * 6, samples)
    assert scores.dtype == torch.float32 and scores.shape == (6,)
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert errors == 3
    assert len(caplog.records) == 1 and "sample 1" in caplog.text and "RuntimeError: boom" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), math.inf, "1.0", None, [1.0]])
def test_score_batch_rejects_non_numbers(bad: object) -> None:
    scores, errors = score_batch(lambda c, s: bad, ["c"], [{}])  # type: ignore[arg-type, return-value]
    assert scores.tolist() == [0.0] and errors == 1


def test_score_batch_accepts_numeric_types() -> None:
    values = [True, 2, 0.5, torch.tensor(0.25)]
    scores, errors = score_batch(lambda c, s: values[s["i"]], ["c"] * 4, [{"i": i} for i in range(4)])
    assert scores.tolist() == [1.0, 2.0, 0.5, 0.25] and errors == 0


def test_score_batch_timeout_is_bounded() -> None:
    def slow(completion: str, sample: dict) -> float:
        if sample["slow"]:
            time.sleep(2.0)
        return 1.0

    samples = [{"slow": i == 1} for i in range(4)]
    start = time.monotonic()
    scores, errors = score_batch(slow, ["c"] * 4, samples, timeout_s=0.2, num_workers=4)
    assert time.monotonic() - start < 1.0
    assert scores.tolist() == [1.0, 0.0, 1.0, 1.0] and errors == 1


def test_score_batch_empty_and_mismatch() -> None:
    scores, errors = score_batch(CountdownReward(), [], [])
    assert scores.shape == (0,) and errors == 0
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        score_batch(CountdownReward(), ["a", "b"], [{}])


def test_score_batch_countdown() -> None:
    fn = CountdownReward(format="plain")
    scores, errors = score_batch(fn, ["3*5+7", "3+5+7", "oops"], [SAMPLE] * 3)
    assert scores.tolist() == pytest.approx([1.0, 0.1, 0.0]) and errors == 0


def my_reward(completion: str, sample: dict) -> float:
    """A user reward found by import path."""
    return float(len(completion))


def test_resolve_reward_paths() -> None:
    fn = resolve_reward("lit_moe_rl.rewards.countdown:CountdownReward")
    assert isinstance(fn, CountdownReward) and fn.format == "tags"
    assert resolve_reward(f"{__name__}:my_reward") is my_reward
    assert resolve_reward(f"{__name__}.my_reward") is my_reward
    assert resolve_reward("countdown_plain").format == "plain"
    instance = CountdownReward(format="plain")
    assert resolve_reward(instance) is instance
    assert isinstance(instance, RewardFn)


def test_resolve_reward_errors() -> None:
    with pytest.raises(
        ValueError, match=r"^rollout.reward: cannot import 'no_such_pkg\.mod:f' \(ModuleNotFoundError: "
    ):
        resolve_reward("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match=r"^rollout.reward: cannot import .*AttributeError"):
        resolve_reward("lit_moe_rl.rewards:nope")
    with pytest.raises(ValueError, match=r"^rollout.reward: .*not callable"):
        resolve_reward("lit_moe_rl.rewards.arith:MAX_EXPR_CHARS")
    with pytest.raises(ValueError, match=r"^rollout.reward: .*not callable"):
        resolve_reward(3)  # type: ignore[arg-type]


def test_math_reward() -> None:
    fn = MathReward()
    assert fn("So the answer is \\boxed{2}.", {"answer": "2"}) == 1.0
    assert fn("So the answer is \\boxed{3}.", {"answer": "2"}) == 0.0
    assert fn("We get $\\frac{1}{2}$", {"answer": "0.5"}) == 1.0
    assert MathReward(answer_key="gold", score=2.0)("\\boxed{4}", {"gold": "\\boxed{4}"}) == 2.0


def test_math_reward_in_worker_threads() -> None:
    # score_batch runs rewards off the main thread, where math-verify's signal timeout cannot work.
    scores, errors = score_batch(MathReward(), ["\\boxed{2}", "\\boxed{5}"], [{"answer": "2"}] * 2)
    assert scores.tolist() == [1.0, 0.0] and errors == 0
