"""Interruptions (issue 19.7): a real SIGTERM saves ``last.ckpt`` at the finished step, prints the summary
and the command that resumes the run, and exits 143; that command resumes it. Ctrl-C (a real SIGINT)
says which step the checkpoint it leaves holds."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import torch

from tests.helpers import ROOT, TINY_ARGS, default_sigint, latest_metrics, read_metrics

SIGNAL_AT = 17  # reward calls: 8 for the step-0 validation, 8 per step: the 17th is step 2's first


def signal_self(completion: str, sample: dict) -> float:
    """A reward that sends this process the signal named by ``$SIGNAL_SELF`` at call ``SIGNAL_AT``."""
    signal_self.calls = getattr(signal_self, "calls", 0) + 1
    rank = os.environ.get("LOCAL_RANK", "0")
    if (
        signal_self.calls == SIGNAL_AT
        and os.environ.get("SIGNAL_SELF")
        and rank == os.environ.get("SIGNAL_RANK", "0")
    ):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_SELF"]))
    return 0.0


def _args(tmp_path, *extra: str) -> list[str]:
    return [
        "fit", *TINY_ARGS, "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", '--model.config={"family": "qwen3_moe"}',
        "--rollout.reward=tests.test_interrupt:signal_self", "--rollout.reward_isolation=thread",
        "--rollout.reward_workers=1", *extra,
    ]  # fmt: skip


def _run(args: list[str], signame: str = "", **more_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SIGNAL_SELF=signame)
    env.update(more_env)
    command = [sys.executable, "-m", "lit_moe_rl.cli", *args]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=default_sigint
    )


def test_sigterm_saves_last_prints_the_summary_and_a_resume_command_that_works(tmp_path):
    done = _run(_args(tmp_path), "SIGTERM")
    out = done.stdout + done.stderr
    assert done.returncode == 143, out[-3000:]
    assert "== lit-moe-rl run summary ==" in out and "optimizer steps: 2" in out
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert f"SIGTERM: stopped after optimizer step 2; {last} holds step 2" in out
    resume = re.search(r"^resume: (.*)$", out, re.M).group(1)
    command = shlex.split(resume)
    assert command[0] == "lit-moe-rl" and command[-2:] == ["--ckpt_path", str(last)]
    resumed = _run(command[1:])  # the printed command, as given (no signal this time)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(latest_metrics(tmp_path / "runs"))
    assert [r["step"] for r in rows if r.get("policy/loss")] == ["3", "4"]  # one step axis across the resume


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """Only rank 1 receives SIGTERM (Lightning's own handler broadcast from inside the signal handler and
    the run died with 'Connection reset by peer'): the ranks agree at the step's end, rank 0 saves and
    prints, both exit 143."""
    from tests.test_distributed import free_port

    args = _args(tmp_path, "--trainer.devices=2", "--data.val_batch_size=4")
    done = _run(args, "SIGTERM", SIGNAL_RANK="1", MASTER_PORT=str(free_port()))
    out = done.stdout + done.stderr
    assert done.returncode == 143, out[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    assert f"SIGTERM: stopped after optimizer step 2; {last} holds step 2" in out
    assert "failed reward calls: 0 of 40" in out  # both ranks: 8 at validation + 2 steps x 2 ranks x 8


def test_ctrl_c_says_which_step_the_checkpoint_holds(tmp_path):
    every_step = [
        "--trainer.callbacks+=lit_moe_rl.checkpoint.LastCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
    ]
    done = _run(_args(tmp_path, *every_step), "SIGINT")  # Ctrl-C during step 2: step 1 is the last saved
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1
    assert f"Ctrl-C: stopped after optimizer step 1; {last} holds step 1" in out
    assert re.search(r"^resume: lit-moe-rl fit .* --ckpt_path " + re.escape(str(last)) + "$", out, re.M)
