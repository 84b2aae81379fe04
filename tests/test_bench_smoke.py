"""The overhead benches that docs/results.md quotes still run (at toy sizes, seconds each)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SMOKE = {  # script: (toy-size arguments, a line of the memory report it must print)
    "r3_overhead.py": (["--steps", "2", "--warmup", "0", "--repeats", "1", "--iters", "1"], "B/token"),
    "rspo_overhead.py": (
        ["--rounds", "1", "--warmup", "0", "--seqs", "8", "--response-len", "8"],
        "extra memory per response token",
    ),
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_runs_and_prints_its_overhead(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *SMOKE[script][0]],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "overhead" in done.stdout and SMOKE[script][1] in done.stdout
