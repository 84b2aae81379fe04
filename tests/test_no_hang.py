"""A run ends on time whatever the reward does (issue: a reward that never returns hung the exit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY_ARGS


def _fit(tmp_path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    args = [
        sys.executable, "-c", "from lit_moe_rl.cli import main; main()", "fit",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        '--model.config={"family": "qwen3_moe"}', "--model.lr=1e-3", "--trainer.max_steps=2",
        *TINY_ARGS, "--rollout.reward_timeout_s=1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - t0


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_run_with_a_reward_that_never_returns_ends_on_time(tmp_path, isolation):
    # 3 scored batches (sanity validation + 2 steps), each ends at its 1 s deadline at the latest;
    # the rest (imports, model, workers) takes ~10-20 s on a loaded 2-core machine: 90 s is the margin
    done, seconds = _fit(
        tmp_path,
        "--rollout.reward=tests.hang_reward:hang_on_odd_length",
        f"--rollout.reward_isolation={isolation}",
        "--rollout.stop_after_failed_batches=0",  # this test is about ending on time, not the stop rule
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "run summary" in out
    # fit itself (sanity validation + 2 steps, each scored batch bounded by its 1 s deadline): a
    # normal tiny run takes ~1-3 s here, so 3 deadlines + 15 s of margin for a loaded machine
    fit_seconds = float(re.search(r"wall time: ([0-9.]+) s", out).group(1))
    assert fit_seconds < 3 * 1.0 + 15, fit_seconds
    assert seconds < 90


def test_reward_that_always_hangs_stops_the_run_in_one_line(tmp_path):
    done, _ = _fit(tmp_path, "--rollout.reward=tests.hang_reward:always_hang", timeout=90)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lit-moe-rl: error: rollout.reward: all ") and "timeout of 1 s" in last
    assert "Traceback" not in done.stderr
