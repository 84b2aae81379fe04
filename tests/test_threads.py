"""The CLI's thread default and OpenMP wait policy (lit_moe_rl/cli/threads.py, README "Threads").

The default rule takes every core with a short spin (``GOMP_SPINCOUNT=1000``); ``one-thread-small`` (one
thread on small machines, half the cores on large ones) is the fallback, and ``all-cores-passive`` sets
``OMP_WAIT_POLICY=PASSIVE``. libgomp reads both variables once, when torch loads: the CLI sets them on
import, before torch, and the tests read back what libgomp parsed (``OMP_DISPLAY_ENV``: its spin count,
0 for a passive policy, 300,000 by default). ``OMP_NUM_THREADS`` and a user's own wait policy win.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lit_moe_rl.cli import threads
from lit_moe_rl.cli.threads import RULE_VAR, apply_num_threads, auto_num_threads, prepare_openmp_env
from tests.helpers import ROOT, run_fit

PASSIVE_AT_LOAD = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}
SHORT_SPIN_AT_LOAD = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "1000"}


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    for var in (RULE_VAR, "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_env_at_torch_load", None)  # prepare_openmp_env's record, restored


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 1), (8, 4), (64, 32)])
def test_one_thread_small_by_cores(monkeypatch, cores, expected):
    monkeypatch.setenv(RULE_VAR, "one-thread-small")
    assert auto_num_threads(cores) == expected


def test_default_rule_takes_every_core_only_when_the_short_spin_was_in_place(monkeypatch):
    assert auto_num_threads(2) == 1  # unknown what libgomp loaded with: one-thread-small's count
    monkeypatch.setattr(threads, "_env_at_torch_load", SHORT_SPIN_AT_LOAD)
    assert (auto_num_threads(2), auto_num_threads(64)) == (2, 64)


def test_a_users_wait_setting_wins_and_a_fallback_says_why(monkeypatch, capsys):
    monkeypatch.setattr(threads, "_env_at_torch_load", PASSIVE_AT_LOAD)  # the user's PASSIVE, default rule
    assert auto_num_threads(2) == 2 and capsys.readouterr().err == ""  # all-cores-passive's environment
    monkeypatch.setattr(threads, "_env_at_torch_load", {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "5000"})
    assert auto_num_threads(2) == 1  # a spin of the user's own: no rule's environment, one-thread-small
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "GOMP_SPINCOUNT=5000" in line and "GOMP_SPINCOUNT=1000" in line
    assert "all-cores-short-spin" in line and "OMP_NUM_THREADS" in line


def test_omp_num_threads_wins_over_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_num_threads(64) == 3
    monkeypatch.setenv(RULE_VAR, "all-cores-passive")
    monkeypatch.setattr(threads, "_env_at_torch_load", PASSIVE_AT_LOAD)
    assert auto_num_threads(64) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5,2")  # a nested list: its first level
    assert auto_num_threads(64) == 5


def test_passive_rule_takes_every_core_only_when_the_policy_was_in_place(monkeypatch):
    monkeypatch.setenv(RULE_VAR, "all-cores-passive")
    assert auto_num_threads(2) == 1  # unknown what libgomp loaded with: today's count
    monkeypatch.setattr(threads, "_env_at_torch_load", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None})
    assert auto_num_threads(2) == 1  # the user's own ACTIVE policy: spinning threads, today's count
    monkeypatch.setattr(threads, "_env_at_torch_load", PASSIVE_AT_LOAD)
    assert (auto_num_threads(2), auto_num_threads(64)) == (2, 64)


def test_prepare_sets_the_policy_before_torch_unless_the_user_set_one():
    rule = {RULE_VAR: "all-cores-passive"}
    env = dict(rule)
    assert prepare_openmp_env(env, torch_loaded=False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and threads._env_at_torch_load == PASSIVE_AT_LOAD
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = rule | user
        assert prepare_openmp_env(env, torch_loaded=False) == {} and env == rule | user
    env = dict(rule)
    assert prepare_openmp_env(env, torch_loaded=True) == {} and env == rule  # too late to matter: untouched
    env = {RULE_VAR: "one-thread-small"}
    assert prepare_openmp_env(env, torch_loaded=False) == {}  # a rule without an environment sets nothing
    env = {}
    assert (
        prepare_openmp_env(env, torch_loaded=False)
        == {"GOMP_SPINCOUNT": "1000"}
        == threads.AUTO_RULES[threads.AUTO_RULE].env
    )  # the default


def _libgomp_report(env: dict[str, str], code: str) -> tuple[str, str]:
    """Run ``code`` with ``env``: the spin count libgomp read when torch loaded (its own report), and
    what ``code`` printed."""
    clean = {k: v for k, v in os.environ.items() if k not in (RULE_VAR, "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    full = clean | {"OMP_DISPLAY_ENV": "verbose", "PYTHONPATH": str(ROOT)} | env
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    spin = next(
        line.split("=")[1].strip(" '") for line in done.stderr.splitlines() if "GOMP_SPINCOUNT =" in line
    )
    return spin, done.stdout.strip()


CLI_FIRST = "import lit_moe_rl.cli.threads as t; import torch; print(t.auto_num_threads(cores=2))"
TORCH_FIRST = "import os, torch; import lit_moe_rl.cli.threads as t; print(t.auto_num_threads(cores=2))"


@pytest.mark.parametrize(
    ("case", "env", "code", "spin", "count"),
    [
        ("default rule", {}, CLI_FIRST, "1000", "2"),
        ("one thread", {RULE_VAR: "one-thread-small"}, CLI_FIRST, "300000", "1"),
        ("passive rule", {RULE_VAR: "all-cores-passive"}, CLI_FIRST, "0", "2"),
        ("OMP_NUM_THREADS wins", {RULE_VAR: "all-cores-passive", "OMP_NUM_THREADS": "1"}, CLI_FIRST, "0", "1"),
        ("user's ACTIVE wins", {RULE_VAR: "all-cores-passive", "OMP_WAIT_POLICY": "ACTIVE"}, CLI_FIRST, "30000000000", "1"),
        ("torch loaded first", {RULE_VAR: "all-cores-passive"}, TORCH_FIRST, "300000", "1"),
        ("torch loaded first, default", {}, TORCH_FIRST, "300000", "1"),
        ("user's PASSIVE, default rule", {"OMP_WAIT_POLICY": "PASSIVE"}, CLI_FIRST, "0", "2"),
    ],
)  # fmt: skip
def test_wait_policy_reaches_openmp_when_torch_loads(case, env, code, spin, count):
    assert _libgomp_report(env, code) == (spin, count), case


def test_apply_sets_torch_threads_and_refuses_negatives(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert apply_num_threads(0) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads: must be an integer >= 0"):
            apply_num_threads(-1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("var", "value", "line"),
    [
        (RULE_VAR, "all-cores", f"{RULE_VAR}: unknown rule 'all-cores'; choose one of one-thread-small, all-cores-passive, all-cores-short-spin"),
        ("OMP_WAIT_POLICY", "sleepy", "OMP_WAIT_POLICY: must be ACTIVE or PASSIVE, got 'sleepy'"),
        ("OMP_NUM_THREADS", "two", "OMP_NUM_THREADS: must be an integer >= 1 (or a comma list of them), got 'two'"),
        ("OMP_NUM_THREADS", "0", "OMP_NUM_THREADS: must be an integer >= 1 (or a comma list of them), got '0'"),
    ],
)  # fmt: skip
def test_bad_thread_environment_is_one_line(monkeypatch, capsys, tmp_path, var, value, line):
    monkeypatch.setenv(var, value)
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        run_fit(tmp_path)
    torch.set_num_threads(before)
    assert exc.value.code == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert lines[-1] == f"lit-moe-rl: error: {line}"
