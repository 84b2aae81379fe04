"""Nothing hangs on a missing peer (issue 19.6): ``--trainer.num_nodes=2`` on one machine waited forever
at ``MEMBER: 1/2``, deaf to Ctrl-C. The rendezvous now has a time limit and one line names the launchers
a multi-node run needs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lit_moe_rl.cli import main
from tests.helpers import ROOT, TINY_ARGS, default_sigint
from tests.test_distributed import free_port


def test_a_second_node_that_never_starts_ends_the_run_in_one_line(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(port),
               LIT_MOE_RL_RENDEZVOUS_TIMEOUT="3")  # fmt: skip
    args = [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *TINY_ARGS, "--trainer.num_nodes=2", "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        '--model.config={"family": "qwen3_moe"}',
    ]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.monotonic() - t0 < 200  # without the limit: 30 minutes (the process group's default)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"lit-moe-rl: error: trainer.num_nodes=2: not every process of the run joined within 3 s (rendezvous at "
        f"127.0.0.1:{port}). A run over several machines must be started on each of them by a launcher: "
        "torchrun --nnodes=2 --nproc-per-node=1 --node-rank=<this node's index>"
    )
    assert "srun lit-moe-rl fit ... in a job with --nodes=2 --ntasks-per-node=1" in line
    assert line.endswith(
        "(on one machine: trainer.num_nodes=1); LIT_MOE_RL_RENDEZVOUS_TIMEOUT=<seconds> waits longer"
    )


def test_ctrl_c_while_waiting_for_a_missing_node_ends_the_run_at_once(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    args = [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *TINY_ARGS, "--trainer.num_nodes=2", "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        '--model.config={"family": "qwen3_moe"}',
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    try:
        lines = []
        for line in proc.stderr:  # wait until it sits in the rendezvous
            lines.append(line)
            if "MEMBER: 1/2" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]  # without the watchdog: deaf to Ctrl-C for 30 minutes
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert rest.strip().splitlines()[-1] == (
        f"lit-moe-rl: interrupted (Ctrl-C) while waiting for the other processes of the run: "
        f"rendezvous at 127.0.0.1:{port}"
    )


def test_a_bad_rendezvous_timeout_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIT_MOE_RL_RENDEZVOUS_TIMEOUT", "soon")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                *TINY_ARGS,
                '--model.config={"family": "qwen3_moe"}',
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lit-moe-rl: error: LIT_MOE_RL_RENDEZVOUS_TIMEOUT: must be a number of seconds > 0, got 'soon'"
    )


def test_a_run_that_fails_before_its_setup_leaves_no_watchdog_behind(tmp_path, monkeypatch, capsys):
    """In-process callers (tests, notebooks) outlive the run: its watchdog must not end them later."""
    import threading

    from lightning.pytorch.strategies import SingleDeviceStrategy

    def fail(self):
        raise ValueError("trainer: the environment could not be set up")

    monkeypatch.setenv("LIT_MOE_RL_RENDEZVOUS_TIMEOUT", "1")
    monkeypatch.setattr(SingleDeviceStrategy, "setup_environment", fail)
    with pytest.raises(SystemExit):
        main([
            "fit", *TINY_ARGS, '--model.config={"family": "qwen3_moe"}', f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ])  # fmt: skip
    time.sleep(1.5)  # past the limit: an armed watchdog would have ended this process
    assert not [t for t in threading.enumerate() if t.name == "rendezvous-watchdog"]
    assert "could not be set up" in capsys.readouterr().err
