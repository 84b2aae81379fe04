"""``bench/gpu_check.py``: the GPU check's whole sequence rehearsed on CPU, and its ability to fail.

The rehearsal runs where the GPU check will run: a virtual environment holding only the GPU image's
packages (symlinked from this interpreter's, no system site-packages, so jsonargparse and math-verify
are absent until the carried wheels are installed), the wheels fetched by ``--wheels`` and installed
offline by ``--install``, then every check at toy size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check, gpu_wheels  # noqa: E402

CHECKS = [
    "env", "experts", "rollout", "fit_grpo", "fit_r3", "fit_gmpo", "fit_rspo", "fit_fsdp2", "overhead", "compile",
]  # fmt: skip


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_gpu_check_runs_on_the_gpu_images_packages_with_the_carried_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    fetch = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--wheels", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if fetch.returncode != 0:  # no PyPI here: rehearse the checks in this environment instead
        _run_checks_here(tmp_path)
        pytest.skip(
            f"--wheels could not download ({fetch.stderr.strip().splitlines()[-1:]}); checks ran here"
        )
    assert fetch.stdout.startswith("GPU command: python bench/gpu_check.py --install bench/wheels --out $OUT")
    names = sorted(w.name.split("-")[0].lower() for w in wheels.glob("*.whl"))
    assert names == sorted(
        ["antlr4_python3_runtime", "docstring_parser", "jsonargparse", "latex2sympy2_extended", "math_verify",
         "typeshed_client"]
    )  # fmt: skip
    python = gpu_wheels.image_venv(tmp_path / "venv")
    env = _clean_env()
    for module in ("jsonargparse", "math_verify", "wandb"):  # the image lacks them: the venv must too
        probe = subprocess.run(
            [str(python), "-c", f"import {module}"], capture_output=True, env=env, cwd=tmp_path
        )
        assert probe.returncode != 0, f"the image venv sees {module}"
    out = tmp_path / "out"
    cmd = [str(python), str(ROOT / "bench" / "gpu_check.py"), "--install", str(wheels), "--device", "cpu",
           "--out", str(out), "--budget", "1500"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("GPU command: ") and lines[1].startswith(f"install: wheels from {wheels}")
    _assert_report(out, proc.stdout)


def _run_checks_here(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path / "out"),
           "--budget", "1500"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_report(tmp_path / "out", proc.stdout)


def _assert_report(out: Path, stdout: str) -> None:
    report = json.loads((out / "report_cpu.json").read_text())
    for name in CHECKS:
        assert report[name]["ok"], (name, report[name])
        assert f"{name}: OK" in stdout
    assert "fit_fsdp" not in report  # Lightning's FSDP v1 is refused by the trainer, not checked
    for name in CHECKS[3:8]:
        fit = report[name]
        assert fit["steps"] == 3 and fit["step_s"] > 0 and fit["update_tokens_per_s"] > 0
        assert fit["peak_mem_gib"] > 0.05  # the CPU process's resident memory, not a missing metric
        assert 0 < fit["lm_head_flops_share"] < 1 and fit["peak_tflops"] == 989.0
        assert max(fit["reward_std"]) > 0 and max(fit["grad_norm"]) > 0  # a learning signal, used
        assert fit["weights"]["moved"] >= 16 and fit["weights"]["finite"]
        assert (out / "logs" / f"{name}.log").stat().st_size > 0  # full logs kept in --out
        plan = fit["memory_plan"]  # the planner beside the run (on CUDA: vs max_memory_allocated)
        assert (
            plan["planned_peak_gib"] > plan["planned_resident_gib"] > 0 and plan["measured_resident_gib"] > 0
        )
        assert "resident planned" in fit["summary"]
    assert report["experts"]["fastest"] in ("eager", "batched_mm", "grouped_mm", "lit_grouped_mm")
    assert report["experts"]["training_kernel"] == "lit_grouped_mm"  # model.experts_implementation: auto
    assert all(isinstance(s, float) for s in report["experts"]["kernel_seconds"].values())  # every kernel ran
    assert report["rollout"]["experts_kernel"] == report["experts"]["training_kernel"]
    assert report["rollout"]["logp_absdiff_mean"] < 1e-3
    assert report["overhead"]["r3_over_grpo"] > 0.5 and report["overhead"]["rspo_over_gmpo"] > 0.5
    compiled = report["compile"]  # bench/compile.py's numbers, parsed from its kept log
    assert compiled["compile_s"] >= 0 and compiled["speedup"] > 0 and compiled["break_even"]
    assert "steady speed-up" in (out / "logs" / "compile.log").read_text()


# -- the check can fail ------------------------------------------------------------------------------

GOOD_ROWS = [
    {"policy/loss": 0.1, "reward/std": 0.2, "policy/grad_norm": 0.5, "policy/skipped_steps": 0.0,
     "routing/rollout_train_overlap_at_k": 1.0, "routing/fallback_real_tokens": 0.0}
] * 3  # fmt: skip
GOOD_PROBE = {"tensors": 3, "moved": 2, "not_moved": ["model.norm.weight"], "moved_frac": 0.5, "finite": True}


def test_fit_verdict_passes_a_run_that_learned():
    verdict = gpu_check.fit_verdict("r3", GOOD_ROWS, GOOD_PROBE, steps=3)
    assert "R3 replay exact" in verdict["signal"]


@pytest.mark.parametrize(
    ("change", "probe", "message"),
    [
        ({"reward/std": 0.0}, GOOD_PROBE, "no reward spread"),
        ({"policy/loss": float("nan")}, GOOD_PROBE, "non-finite loss"),
        ({"policy/grad_norm": 0.0}, GOOD_PROBE, "gradient norms"),
        ({"policy/skipped_steps": 1.0}, GOOD_PROBE, "skipped"),
        ({"routing/rollout_train_overlap_at_k": 0.999}, GOOD_PROBE, "R3 replay not exact"),
        ({"routing/fallback_real_tokens": 2.0}, GOOD_PROBE, "R3 replay not exact"),
        ({}, {**GOOD_PROBE, "not_moved": ["lm_head.weight"]}, "1 matrices did not move"),
        ({}, {**GOOD_PROBE, "finite": False}, "finite=False"),
    ],
)
def test_fit_verdict_fails_a_run_without_signal_or_exact_replay(change, probe, message):
    rows = [{**row, **change} for row in GOOD_ROWS]
    with pytest.raises(RuntimeError, match=message):
        gpu_check.fit_verdict("r3", rows, probe, steps=3)


def test_a_fit_that_runs_out_of_its_share_keeps_its_log(tmp_path, monkeypatch):
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path)])

    def too_slow(cmd, stdout, **kw):
        stdout.write("step 1 of 3\n")
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(gpu_check.subprocess, "run", too_slow)
    with pytest.raises(TimeoutError, match=r"no result within 40 s .*fit_grpo\.log"):
        gpu_check.check_fit(args, "grpo", tmp_path / "tok", 40.0, None)
    assert (tmp_path / "logs" / "fit_grpo.log").read_text() == "step 1 of 3\n"
    with pytest.raises(TimeoutError, match="budget"):
        gpu_check.check_fit(args, "grpo", tmp_path / "tok", 5.0, None)


def test_budget_shares_what_is_left_between_the_runs():
    budget = gpu_check.Budget(480.0)
    assert 465 * 0.99 / 5 < budget.share(5) <= (480 - gpu_check.RESERVE_S) / 5


def test_children_get_the_project_root_prepended_to_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"/opt/a{os.pathsep}/opt/b")
    assert gpu_wheels.pythonpath(ROOT, None, "/site") == os.pathsep.join(
        [str(ROOT), "/site", "/opt/a", "/opt/b"]
    )


def test_install_falls_back_to_a_target_folder_when_site_packages_refuses(tmp_path, monkeypatch):
    (tmp_path / "jsonargparse-0.0.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "no_such_dist_xyz-1.0-py3-none-any.whl").write_bytes(b"")
    calls = []

    def pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if "--target" not in cmd else 0, "", "Permission denied")

    monkeypatch.setattr(gpu_wheels.subprocess, "run", pip)
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = gpu_wheels.install(tmp_path)
    assert target is not None and sys.path[0] == str(target)
    assert [c[-1].endswith("no_such_dist_xyz-1.0-py3-none-any.whl") for c in calls] == [
        True,
        True,
    ]  # only the missing one
    assert "--no-index" in calls[0] and "--target" in calls[1]


def test_the_readme_gives_the_printed_gpu_command_and_carry_folder():
    readme = (ROOT / "README.md").read_text()
    assert gpu_check.GPU_COMMAND in readme and f"carrying the folder `{gpu_check.WHEELS}`" in readme
    assert f"python bench/gpu_check.py --wheels {gpu_check.WHEELS}" in readme
    assert f"{gpu_check.WHEELS}/" in (ROOT / ".gitignore").read_text().splitlines()


def test_install_unzips_the_wheels_when_pip_cannot_install_at_all(tmp_path, monkeypatch):
    import zipfile

    wheel = tmp_path / "wheels" / "gpu_check_fake_dist-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpu_check_fake_mod.py", "VALUE = 7\n")
    monkeypatch.setattr(
        gpu_wheels.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No module named pip"),
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = gpu_wheels.install(wheel.parent)
    import gpu_check_fake_mod  # noqa: F401  (found on sys.path[0], the unzipped target)

    assert gpu_check_fake_mod.VALUE == 7 and Path(gpu_check_fake_mod.__file__).parent == target
    sys.modules.pop("gpu_check_fake_mod")


def test_the_watchdog_writes_the_partial_report_and_exits_124(tmp_path, monkeypatch):
    import threading

    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path), "--budget", "16"])
    budget = gpu_check.Budget(16.0)
    budget.deadline = 0.0  # already past
    exited = threading.Event()
    codes = []
    monkeypatch.setattr(gpu_check, "WATCHDOG_GRACE_S", 0.05)
    monkeypatch.setattr(gpu_check.os, "_exit", lambda code: (codes.append(code), exited.set()))
    gpu_check.start_watchdog(args, budget, {"env": {"ok": True}})
    assert exited.wait(10) and codes == [124]
    report = json.loads((tmp_path / "report_cpu.json").read_text())
    assert report["env"]["ok"] and report["budget_exceeded"]["ok"] is False


def test_the_update_is_timed_after_a_device_sync(monkeypatch):
    import torch

    from lit_moe_rl.algorithms import GRPO
    from lit_moe_rl.learner import Learner, LearnerSettings
    from lit_moe_rl.parallel.distributed import Collectives

    cuda = torch.device("cuda", 0)
    learner = Learner(torch.nn.Linear(1, 1), GRPO(), LearnerSettings(), collectives=Collectives(cuda))
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    learner.synced_clock()
    assert synced == [cuda]


def test_plan_vs_measured_names_max_memory_allocated_on_cuda():
    gib = 1024**3
    record = {
        "planned_resident": gib,
        "measured_resident": gib,
        "planned_peak": 3 * gib,
        "cuda_max_allocated": 2 * gib,
    }
    text = gpu_check.plan_vs_measured(record)["plan_summary"]
    assert text.startswith(
        "peak planned 3.00 GiB vs max_memory_allocated 2.00 GiB; resident planned 1.000 GiB"
    )
