"""The one-line rewriting of jsonargparse's error texts (pure string functions, hand-written inputs)."""

from __future__ import annotations

from lit_moe_rl.errors import close_matches, one_line, parse_error

UNION = (
    'Parser key "rollout.engine":\n  Does not validate against any of the Union subtypes\n'
    "  Subtypes: [<class 'RolloutEngine'>, <class 'NoneType'>]\n  Errors:\n"
    "    - Problem with given class_path 'lit_moe_rl.rollout.engine.HFEngine':\n"
    "        rollout.engine.temperature: must be > 0, got 0.0\n"
    "    - Expected a <class 'NoneType'>\n  Given value type: <class 'Namespace'>\n  Given value: Namespace()"
)


def test_union_block_is_unwrapped_to_the_settings_own_message():
    assert one_line(UNION) == "rollout.engine.temperature: must be > 0, got 0.0"


def test_nested_parser_keys_are_joined_and_literals_reworded():
    text = UNION.replace(
        "rollout.engine.temperature: must be > 0, got 0.0",
        "Parser key \"format\":\n          Expected a typing.Literal['tags', 'plain']. Got value: bogus",
    )
    assert one_line(text) == "rollout.engine.format: expected one of 'tags', 'plain', got 'bogus'"


def test_message_without_a_setting_gets_the_key():
    assert (
        one_line(UNION.replace("rollout.engine.temperature: ", "")) == "rollout.engine: must be > 0, got 0.0"
    )


def test_close_matches_on_whole_names_and_last_components():
    assert close_matches("model.lrr", ["model.lr", "data.path"]) == " (did you mean model.lr?)"
    assert "pkg.algorithms.GRPO" in close_matches("other.GPRO", ["pkg.algorithms.GRPO", "pkg.x.Y"])
    assert close_matches("zzzz", ["model.lr"]) == ""


def test_parse_error_kinds():
    keys = ["trainer.max_steps", "model.lr"]
    assert parse_error("unrecognized arguments: --trainer.max_stepz=3", keys, {}) == (
        "trainer.max_stepz: unknown setting (did you mean trainer.max_steps?)"
    )
    assert parse_error("Subcommand 'fit' does not accept option 'model.lrr'", keys, {}).startswith(
        "model.lrr: unknown setting (did you mean model.lr"
    )
    sections = [
        "model",
        "model.algorithm",
        "model.lr",
        "model.algorithm.clip_low",
    ]  # the parser knows sections too
    assert parse_error("Subcommand 'fit' does not accept option 'model.lrr'", sections, {}) == (
        "model.lrr: unknown setting (did you mean model.lr, model.algorithm?)"  # not the section it is in
    )
    assert "model.algorithm.clip_low" in parse_error(
        "Subcommand 'fit' does not accept option 'model.algorithm.clip_lo'", sections, {}
    )
    assert parse_error(
        "argument subcommand: invalid choice: 'tset' (choose from 'fit', 'validate')", keys, {}
    ) == ("unknown subcommand 'tset' (choose from fit, validate)")
