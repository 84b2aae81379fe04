"""The benches that docs/results.md and the README quote still run (at toy sizes, seconds each)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SMOKE = {  # script: (toy-size arguments, what its report must print)
    "compile.py": (["--quick", "--backend", "aot_eager", "--r3"], ["compile time", "break-even"]),
    "r3_overhead.py": (
        ["--steps", "2", "--warmup", "0", "--repeats", "1", "--iters", "1"],
        ["overhead", "B/token"],
    ),
    "rspo_overhead.py": (
        ["--rounds", "1", "--warmup", "0", "--seqs", "8", "--response-len", "8"],
        ["overhead", "extra memory per response token"],
    ),
    "experts.py": (
        ["--rows", "2", "--length", "8", "--repeats", "1", "--top-k", "4"],
        ["| lit_grouped_mm |", "index_put share"],
    ),
    "threads.py": (["--quick"], ["| one | OMP_NUM_THREADS=1 |", "idle s/step | loaded s/step"]),
    "logprob_chunks.py": (
        ["--vocab", "4096", "--rows", "2", "--length", "8", "--repeats", "1"],
        ["page faults", "(auto)"],
    ),
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_runs_and_prints_its_report(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *SMOKE[script][0]],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(line in done.stdout for line in SMOKE[script][1])
