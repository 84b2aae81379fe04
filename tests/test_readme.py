"""The README's commands: the quickstart runs (shortened by CLI overrides), the rest are checked.

The install command (``pip install -e ".[dev]"``) and the test command (``python -m pytest -q``) are
what CI's ``.ci/run`` executes, so this test checks ``.ci/run`` runs exactly them.
"""

from __future__ import annotations

import os
import re
import shlex

from lit_moe_rl.cli import main
from tests.helpers import ROOT, latest_metrics, train_rows

README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """Every line of every ```bash block, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def test_readme_opens_with_install_then_quickstart_then_tests():
    commands = _commands()
    assert commands[:4] == [
        "pip install torch==2.13.0",
        'pip install -e ".[dev]"',
        "lit-moe-rl fit --config configs/quickstart.yaml",
        "python -m pytest -q",
    ]


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run installs with the README's two commands, word for word (as ``python -m pip ... --quiet``)."""
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [c for c in _commands() if c.startswith("pip install")][:2]
    as_run = [c.replace("pip install", "python -m pip install --quiet", 1) for c in installs]
    assert all(command in ci for command in as_run), as_run
    assert ci.index(as_run[0]) < ci.index(as_run[1])
    assert "python -m pytest -q" in ci


def _lit_moe_rl(command: str, *overrides: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "lit-moe-rl"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main([*argv[1:], *overrides])
    finally:
        os.chdir(cwd)


def test_quickstart_command_runs_shortened(tmp_path):
    _lit_moe_rl(
        "lit-moe-rl fit --config configs/quickstart.yaml",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--data.num_val=8",
        "--data.val_batch_size=8",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    )
    rows = train_rows(latest_metrics(tmp_path))
    assert len(rows) == 2
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)


def test_sft_command_runs_shortened(tmp_path):
    sfts = [c for c in _commands() if c.startswith("lit-moe-rl sft")]
    assert len(sfts) == 2 and "--model.export_dir=lit_moe_rl/assets/countdown-tiny-moe" in sfts[1]
    _lit_moe_rl(  # the rebuild command exports to the asset; the test's later override keeps it in tmp
        sfts[1],
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--data.num_train=64",
        "--data.num_val=8",
        "--data.val_batch_size=8",
        f"--model.export_dir={tmp_path / 'model'}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert list(
        tmp_path.glob("quickstart_sft/version_*/config.yaml")
    )  # README: runs/quickstart_sft/version_*


def test_real_checkpoint_command_parses(capsys):
    (real,) = [c for c in _commands() if "qwen3_30b_a3b_rspo" in c and c.startswith("lit-moe-rl fit")]
    argv = shlex.split(real)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        try:
            main([*argv[1:], "--print_config"])
        except SystemExit as exc:
            assert exc.code in (0, None)
    finally:
        os.chdir(cwd)
    assert "Qwen3-30B-A3B" in capsys.readouterr().out


def test_fsdp2_command_runs_shortened_on_two_processes(tmp_path):
    """`lit-moe-rl fit --config configs/tiny_fsdp2.yaml`: Lightning launches the second rank itself."""
    import subprocess
    import sys

    (command,) = [c for c in _commands() if "tiny_fsdp2" in c]
    args = shlex.split(command)[1:]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "lit_moe_rl.cli", *args, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--data.num_val=8",
         f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = train_rows(latest_metrics(tmp_path))
    assert len(rows) == 1 and 0.0 <= rows[0]["reward/mean"] <= 1.0


def test_gpu_check_command_is_the_one_the_tests_run():
    assert "python bench/gpu_check.py --device cpu" in _commands()  # tests/test_gpu_check.py runs it


def test_export_command_writes_a_finished_runs_policy(tmp_path):
    """README "Export": the command, with <run> a finished (shortened) quickstart run."""
    (command,) = [c for c in _commands() if "HFExportCallback" in c]
    _lit_moe_rl(
        "lit-moe-rl fit --config configs/quickstart.yaml",
        "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false",
        "--data.num_val=8",
        "--data.val_batch_size=8",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    )
    (config,) = tmp_path.rglob("config.yaml")
    run = config.parent
    _lit_moe_rl(command.replace("<run>", str(run)), "--trainer.enable_progress_bar=false")
    assert (run / "hf_model" / "config.json").is_file() and (run / "hf_model" / "tokenizer.json").is_file()


def test_plan_commands_print_plans_that_fit(capsys):
    """The "Memory" section's `lit-moe-rl plan` commands, and the plan figures its table quotes."""
    commands = [c for c in _commands() if c.startswith("lit-moe-rl plan")]
    assert len(commands) == 2
    for command in commands:
        _lit_moe_rl(command)
        out = capsys.readouterr().out
        peak = next(line for line in out.splitlines() if line.strip().startswith("peak "))
        assert peak.endswith(": fits"), peak
        figure = peak.split("peak ")[1].split(" GiB")[0]
        assert f"| {figure} GiB (generation)" in README, (command, figure)
