"""Every bad input in docs/errors.md stops with one line naming the setting or file, exit status 2.

Each case runs ``lit-moe-rl`` in-process on a tiny model; the last stderr line must be the error, and no
traceback may be printed. (tests/test_no_hang.py checks the same through a real subprocess.)
"""

from __future__ import annotations

import pytest
import torch

from lit_moe_rl.cli import main
from tests.helpers import run_fit

ASSET = "lit_moe_rl/assets/countdown-tiny-moe"


def _error(capsys, tmp_path, *extra: str, raw: bool = False) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(extra)) if raw else run_fit(tmp_path, *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("lit-moe-rl: error: ")
    assert sum(line.startswith("lit-moe-rl: error:") for line in lines) == 1
    return lines[-1]


SETTINGS_CASES = [
    # (extra args, text the one line must contain)
    (
        ["--rollout.engine.temperature=0"],
        "lit-moe-rl: error: rollout.engine.temperature: must be > 0, got 0.0",
    ),
    (["--model.no_such_key=1"], "model.no_such_key: unknown setting"),
    (["--trainer.max_stepz=3"], "trainer.max_stepz: unknown setting (did you mean trainer.max_steps"),
    (
        ["--model.algorithm=lit_moe_rl.algorithms.GPRO"],
        "(did you mean lit_moe_rl.algorithms.GSPO, lit_moe_rl.algorithms.GRPO",
    ),
    (["--model.algorithm=lit_moe_rl.algorithm.GSPO"], "did you mean lit_moe_rl.algorithms.GSPO"),
    (["--model.algorithm=lit_moe_rl.algorithms.Algorithm"], "abstract base class; choose one of GRPO"),
    (["--model.algorithm=lit_moe_rl.algorithms.SequenceObjective"], "SequenceObjective is an abstract base"),
    (["--model.algorithm.clip_low=0.1"], "model.algorithm: choose a class before setting its init_args"),
    (["--model.algorithm=GRPO", "--model.algorithm.clipp_low=0.1"], "clipp_low: not a parameter of"),
    (["--model.algorithm=GRPO", "--model.algorithm.clip_low=-1"], "model.algorithm.clip_low: must be >= 0"),
    (
        ["--model.algorithm=GRPO", "--model.algorithm.clip_ratio_c=0.5"],
        "model.algorithm.clip_ratio_c: must be > 1",
    ),
    (
        ["--model.algorithm=RSPO", "--model.algorithm.router_shift_floor=2"],
        "router_shift_floor: must be in [0, 1]",
    ),
    (
        ["--rollout.reward.format=bogus"],
        "rollout.reward.format: expected one of 'tags', 'plain', got 'bogus'",
    ),
    (
        ["--rollout.engine=lit_moe_rl.rollout.engine.HFEngin"],
        "did you mean lit_moe_rl.rollout.engine.HFEngine",
    ),
    (["--model.lr=-1"], "model.lr: must be a finite number > 0, got -1.0"),
    (["--model.grad_clip=-1"], "model.grad_clip: must be >= 0 (0 turns clipping off), got -1.0"),
    (["--model.warmup_steps=-5"], "model.warmup_steps: must be >= 0"),
    (["--model.logprob_chunk_size=0"], "model.logprob_chunk_size: must be >= 1"),
    (["--data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
    (["--rollout.group_size=0"], "rollout.group_size: must be >= 1, got 0"),
    (
        ["--trainer.max_steps=-5"],
        "trainer.max_steps: must be >= 0 optimizer steps, or -1 for no limit, got -5",
    ),
    (["--model.betas=[0.9, 1.5]"], "model.betas: must be two numbers in [0, 1)"),
    (['--model.lora={"rr": 8}'], "model.lora: unknown setting 'rr'"),
    (['--model.lora={"rank": 0}'], "model.lora.rank: must be an integer >= 1"),
    (['--model.lora={"dropout": 1.5}'], "model.lora.dropout: must be in [0, 1)"),
    (['--model.config={"family": "qwen3_moe", "hidden_size": -5}'], "model.config: cannot load"),
    (["--model.tokenizer=/nonexistent/tok"], "model.tokenizer: '/nonexistent/tok' is not a local folder"),
    (["--rollout.reward_timeout_s=0"], "rollout.reward_timeout_s: must be > 0"),
    (["--rollout.reward_workers=0"], "rollout.reward_workers: must be >= 1"),
    (["--rollout.reward_isolation=fork"], "rollout.reward_isolation: expected one of"),
    (["--rollout.stop_after_failed_batches=-1"], "rollout.stop_after_failed_batches: must be >= 0"),
    (["--num_threads=-2"], "num_threads: must be an integer >= 0"),
    (
        ["--model.experts_implementation=fastest"],
        "model.experts_implementation: unknown 'fastest'; choose one of auto",
    ),
    (["--model.shared_prefix=maybe"], "model.shared_prefix: expected one of 'auto', 'off'"),
    (["--model.skip_padding=maybe"], "model.skip_padding: expected true or false, got 'maybe'"),
    (["--trainer.accelerator=gpu"], "trainer.accelerator: 'gpu' but this machine has no CUDA GPU"),
    (["--rollout.reward=no_such_module:fn"], "rollout.reward: cannot import 'no_such_module:fn'"),
]


@pytest.mark.parametrize(("extra", "needle"), SETTINGS_CASES, ids=lambda v: str(v)[:60])
def test_bad_setting_is_one_line(capsys, tmp_path, extra, needle):
    if extra == ["--trainer.accelerator=gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert needle in _error(capsys, tmp_path, *extra)


@pytest.mark.parametrize("value", ["-1", "two"])
def test_a_bad_thread_count_is_refused_by_print_config_too(capsys, tmp_path, value):
    line = _error(capsys, tmp_path, "fit", f"--num_threads={value}", "--print_config", raw=True)
    assert line == f"lit-moe-rl: error: num_threads: must be an integer >= 0 (0 = auto), got {value}"


def test_a_bad_thread_count_in_a_config_file_names_the_file(capsys, tmp_path):
    config = tmp_path / "threads.yaml"
    config.write_text("num_threads: -4\n")
    line = _error(capsys, tmp_path, "fit", f"--config={config}", "--print_config", raw=True)
    assert line.endswith(f"num_threads: must be an integer >= 0 (0 = auto), got -4 (in --config {config})")


def test_yaml_syntax_error_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    line = _error(capsys, tmp_path, f"--config={bad}")
    assert f"--config {bad}: YAML syntax error at line 3" in line


def test_bad_callback_snippet_file_names_it(capsys, tmp_path):
    bad = tmp_path / "cb.yaml"
    bad.write_text("class_path: [x\n")
    line = _error(capsys, tmp_path, f"--trainer.callbacks+={bad}")
    assert f"--trainer.callbacks+={bad}: YAML syntax error at line 2" in line
    line = _error(capsys, tmp_path, f"--trainer.callbacks+={tmp_path / 'none.yaml'}")
    assert "none.yaml: no such file" in line


@pytest.mark.parametrize(("extra", "needle"), [
    (["--trainer.max_steps=abc"], "trainer.max_steps: expected int, got 'abc'"),
    (["--trainer.max_step=3"], "trainer.max_step: unknown setting (did you mean trainer.max_steps"),  # no abbrev
    (["--data.batch_size=1.5"], "data.batch_size: expected int, got '1.5'"),
    (["--model.router_lr_scale=nan"], "model.router_lr_scale: expected a finite float, got 'nan'"),
    (["--model.trim_padding=1"], "model.trim_padding: expected true or false, got '1'"),
    (["--trainer.strategy=nope"], "trainer.strategy: You selected an invalid strategy name"),
    (["--trainer.devices=0"], "trainer.devices: Trainer(devices='0') value is not a valid input"),
    ([], "choose a subcommand: fit, validate or sft"),
])  # fmt: skip
def test_wrong_types_and_no_subcommand(capsys, tmp_path, extra, needle):
    assert needle in _error(capsys, tmp_path, *extra, raw=not extra)


def test_unknown_key_in_a_config_file_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  lrr: 0.1\n")
    line = _error(capsys, tmp_path, f"--config={cfg}")
    assert "model.lrr: unknown setting (did you mean model.lr" in line and f"(in --config {cfg})" in line


def test_a_typo_on_the_command_line_is_named_as_typed_not_blamed_on_the_config(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  algorithm: lit_moe_rl.algorithms.GRPO\n")
    line = _error(capsys, tmp_path, f"--config={cfg}", "--model.algorithm.clip_lo=0.1")
    assert "model.algorithm.clip_lo: not a parameter of lit_moe_rl.algorithms.GRPO" in line
    assert "(did you mean clip_low" in line and "--config" not in line
    cfg.write_text(
        "model:\n  algorithm:\n    class_path: lit_moe_rl.algorithms.GRPO\n    init_args: {clip_lo: 0.1}\n"
    )
    line = _error(capsys, tmp_path, f"--config={cfg}")
    assert "model.algorithm.init_args.clip_lo: not a parameter" in line and f"(in --config {cfg})" in line


def test_where_set_names_only_the_config_files_that_set_the_key_and_no_file_for_a_subcommand(tmp_path):
    from lit_moe_rl.cli.base import where_set

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  lr: 1.0e-6\n  algorithm:\n    class_path: GRPO\n")
    second.write_text("model:\n  lrr: 1\n  algorithm:\n    init_args:\n      clip_lo: 0.1\n")
    argv = ["fit", "--config", str(first), "--config", str(second)]
    assert (
        where_set("model.lrr: unknown setting", argv) == f"model.lrr: unknown setting (in --config {second})"
    )
    assert where_set("model.algorithm.init_args.clip_lo: bad", argv).endswith(f"(in --config {second})")
    assert where_set("model.lr: bad", argv) == f"model.lr: bad (in --config {first})"
    both = where_set("model.warmup_steps: bad", argv)  # set in neither: both are named
    assert both.endswith(f"(in --config {first}, {second})")
    subcommand = "unknown subcommand 'fitt' (choose from fit, validate, sft, plan)"
    assert where_set(subcommand, ["fitt", "--config", str(first)]) == subcommand


def test_where_set_names_command_line_keys_appended_or_given_as_a_whole():
    from lit_moe_rl.cli.base import where_set

    config = ["--config=c.yaml"]
    assert (
        where_set("trainer.callbacks: bad", [*config, "--trainer.callbacks+=x"]) == "trainer.callbacks: bad"
    )
    assert where_set("model.torch_compile.mode: bad", [*config, "--model.torch_compile={}"]).endswith("bad")
    assert where_set("model.lr: bad", [*config, "--model.lr", "0.1"]) == "model.lr: bad"
    assert where_set("model.lr: bad", [*config, "--model.lrr=1"]) == "model.lr: bad (in --config c.yaml)"
    spelled_out = [*config, "--model.algorithm.init_args.clip_low=abc"]
    assert (
        where_set("model.algorithm.init_args.clip_low: bad", spelled_out) == "model.algorithm.clip_low: bad"
    )


def test_missing_config_file(capsys, tmp_path):
    assert "--config /nope.yaml: no such file" in _error(capsys, tmp_path, "--config=/nope.yaml")


@pytest.mark.parametrize("content", [b"garbage" * 20, None])  # garbage, and a truncated copy
def test_corrupt_safetensors_names_the_model_folder(capsys, tmp_path, content):
    import shutil

    from tests.helpers import ROOT

    folder = tmp_path / "model"
    shutil.copytree(ROOT / ASSET, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(content if content is not None else data[: len(data) // 2])
    line = _error(capsys, tmp_path, f"--model.pretrained={folder}", "--model.config=null")
    assert f"model.pretrained: {folder} has a truncated or corrupt .safetensors file" in line


@pytest.mark.parametrize("kind", ["garbage", "truncated", "not_a_checkpoint"])
def test_bad_ckpt_path_is_one_line(capsys, tmp_path, kind):
    ckpt = tmp_path / "x.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x80\x02garbage" * 10)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    line = _error(capsys, tmp_path, f"--ckpt_path={ckpt}")
    assert line.startswith(f"lit-moe-rl: error: --ckpt_path {ckpt}: ")
    assert ("not a Lightning checkpoint" if kind == "not_a_checkpoint" else "not a readable") in line


def test_unwritable_log_folder(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _error(capsys, tmp_path, f"--trainer.logger.init_args.save_dir={blocker}/runs")
    assert f"trainer.logger.init_args.save_dir: cannot write to '{blocker}/runs' (Not a directory)" in line


def test_wandb_online_without_key_fails_fast(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    line = _error(capsys, tmp_path, "--trainer.logger=WandbLogger")
    assert "trainer.logger: WandbLogger is online but no W&B API key" in line and "WANDB_MODE=offline" in line


def test_wandb_online_without_network_fails_fast(capsys, tmp_path, monkeypatch):
    import socket

    with socket.socket() as closed:  # a local port nobody listens on: refused at once, no network used
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    line = _error(capsys, tmp_path, "--trainer.logger=WandbLogger")
    assert f"127.0.0.1:{port} cannot be reached" in line and "WANDB_MODE=offline" in line


@pytest.mark.parametrize(("argv", "needle"), [
    (["test"], "'test' has no meaning for RL training"),
    (["predict"], "'predict' has no meaning here"),
    (["frobnicate"], "unknown subcommand 'frobnicate' (choose from fit, validate, sft, plan)"),
])  # fmt: skip
def test_subcommands_without_meaning(capsys, tmp_path, argv, needle):
    assert needle in _error(capsys, tmp_path, *argv, raw=True)


def test_countdown_reward_on_rows_without_its_fields_stops_before_training(capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "{i} + {i} =", "answer": "{2 * i}"}}\n' for i in range(16)))
    line = _error(capsys, tmp_path, "--data.source=file", f"--data.path={rows}", "--data.num_val=4")
    assert "rollout.reward: all " in line and "KeyError" in line and "'numbers'" in line


def test_help_names_the_tool_and_lists_sft_and_plan_and_no_test(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "Supervised warm start" in out and "plan" in out
    assert out.startswith("usage: lit-moe-rl ") and "Lightning Trainer command line tool" not in out
    assert "configs/quickstart.yaml" in out  # the description says how to start
    assert "test" not in out.split("subcommands", 1)[-1].split("\n\n")[0].replace("attest", "")


def test_algorithm_help_lists_only_concrete_classes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.algorithm.help=GRPO"])
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "lit_moe_rl.algorithms.GRPO" in out
    assert "lit_moe_rl.algorithms.Algorithm," not in out and "SequenceObjective" not in out


def test_a_model_setting_error_is_the_only_line_and_a_good_run_says_its_seed(tmp_path, caplog):
    """Lightning said ``Seed set to 0`` before the model was built, so a model setting's error came second."""
    import logging
    import warnings

    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_fit(tmp_path, "--model.lr=-1")  # no seed_everything in the config: Lightning warned instead
    assert not [r for r in caplog.records if "Seed set" in r.getMessage()]
    assert not [w for w in caught if "seed set to" in str(w.message)]
    run_fit(tmp_path, "--trainer.limit_val_batches=0", steps=1)
    assert [r.getMessage() for r in caplog.records if "Seed set" in r.getMessage()] == ["Seed set to 0"]
