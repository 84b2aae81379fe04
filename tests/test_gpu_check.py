"""``bench/gpu_check.py --device cpu``: the GPU check's every code path at toy size, as CI runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report_cpu.json").read_text())
    checks = [
        "env",
        "experts",
        "rollout",
        "fit_grpo",
        "fit_r3",
        "fit_gmpo",
        "fit_rspo",
        "fit_fsdp2",
        "overhead",
    ]
    for name in checks:
        assert report[name]["ok"], (name, report[name])
        assert f"{name}: OK" in proc.stdout
    for name in ("fit_grpo", "fit_r3", "fit_rspo", "fit_fsdp2"):
        fit = report[name]
        assert fit["steps"] == 3 and fit["step_s"] > 0 and fit["update_tokens_per_s"] > 0
        assert fit["peak_mem_gib"] > 0.05  # the CPU process's resident memory, not a missing metric
    assert report["fit_fsdp"]["skipped"]  # Lightning's FSDPStrategy refuses CPU
    assert report["experts"]["fastest"] in ("eager", "batched_mm", "grouped_mm")
    assert report["overhead"]["r3_over_grpo"] > 0.5 and report["overhead"]["rspo_over_gmpo"] > 0.5
