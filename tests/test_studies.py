"""The studies' quick modes run end to end and write a results section, a plot and parseable numbers;
their overlay configs parse on top of the quickstart."""

import os
import subprocess
import sys

import pytest
import yaml

from lit_moe_rl.cli import main
from tests.helpers import ROOT

OVERLAYS = sorted((ROOT / "studies" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_study_overlay_parses_over_the_quickstart(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            ["fit", f"--config={ROOT / 'configs' / 'quickstart.yaml'}", f"--config={path}", "--print_config"]
        )
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    overlay = yaml.safe_load(path.read_text())
    assert printed["model"]["lr"] == overlay.get("model", {}).get("lr", printed["model"]["lr"])
    assert printed["trainer"]["max_steps"] == overlay["trainer"]["max_steps"]  # the overlay wins
    if path.name == "r3.yaml":  # merged into the quickstart's engine, not replacing it
        assert printed["rollout"]["engine"]["init_args"]["dtype"] == "bfloat16"
        assert printed["rollout"]["engine"]["init_args"]["max_new_tokens"] == 12


def test_r3_study_quick_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "studies" / "r3.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "results.md").read_text()
    assert "<!-- study:r3 -->" in page and "<!-- /study:r3 -->" in page
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| r3_")}
    assert set(rows) == {"r3_off", "r3_on"}
    kl = {arm: float(line.split("|")[3]) for arm, line in rows.items()}
    assert (
        kl["r3_off"] > 0 and kl["r3_on"] > 0
    )  # a bf16 engine beside an fp32 trainer always differs a little
    disagreement_on = float(rows["r3_on"].split("|")[8])
    assert disagreement_on == 0.0  # R3 replays the engine's routes: the trainer used exactly those experts
    assert (tmp_path / "img" / "r3_mismatch.png").stat().st_size > 10_000


def _rspo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rspo_study", ROOT / "studies" / "rspo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val_rows(*rewards):
    return [{"rollouts": float(20 * i), "val/reward": r} for i, r in enumerate(rewards)]


def test_collapse_means_the_last_three_evaluations_below_half_the_best():
    collapsed = _rspo().collapsed
    assert collapsed(_val_rows(0.2, 0.5, 0.24, 0.1, 0.2))  # best 0.5: 0.24, 0.1, 0.2 all < 0.25
    assert not collapsed(_val_rows(0.2, 0.5, 0.1, 0.1, 0.3))  # recovered at the end
    assert not collapsed(_val_rows(0.2, 0.5, 0.24, 0.25, 0.1))  # 0.25 is not below half of 0.5
    assert not collapsed(_val_rows(0.5, 0.1, 0.1))  # too few evaluations to tell


def _table(page: str, header_start: str) -> dict[str, list[str]]:
    """The rows (split on ``|``) of the Markdown table whose header begins ``| <header_start> |``, by arm."""
    lines = page.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    rows = {}
    for line in lines[top + 2 :]:
        if not line.startswith("| "):
            break
        rows[line.split("|")[1].strip()] = [cell.strip() for cell in line.split("|")]
    return rows


def test_rspo_study_quick_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "studies" / "rspo.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "results.md").read_text()
    results, settings = _table(page, "arm | collapsed"), _table(page, "arm | class")
    arms = {"GRPO", "GSPO", "GMPO", "RSPO", "GRPO+RS", "GRPO+R3", "RSPO+R3", "RSPO-sum"}
    assert set(results) == set(settings) == arms
    assert len({float(results[arm][3]) for arm in arms}) == 1  # one warm start, evaluated before training
    for arm in arms:  # every arm logs the router shift; γ̃ is floored at 0.8
        gamma, changed = float(results[arm][9]), float(results[arm][11])
        assert 0.8 <= gamma <= 1.0
        assert changed == 0.0 if arm.endswith("R3") else changed > 0  # R3 replays the rollout's top-K
    # what ran, read back from each arm's saved config: the algorithm's own clip, not the overlay's GRPO one
    assert settings["GSPO"][2:5] == ["GSPO", "0.0003", "0.0004"]
    assert settings["RSPO"][2:6] == ["RSPO", "0.4", "0.4", "True"]
    assert settings["GRPO+RS"][2:6] == ["GRPO", "0.2", "0.2", "True"]
    assert settings["RSPO-sum"][7] == "sum" and settings["RSPO+R3"][-2] == "R3"
    assert (tmp_path / "img" / "rspo.png").stat().st_size > 10_000


def test_a_finished_study_run_is_read_back_not_rerun(tmp_path, monkeypatch):
    """``runner._fit`` reruns only when the command or a --config file changed (``done.json``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("runner", ROOT / "studies" / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model: {lr: 1.0e-4}\n")
    calls = []

    def fake_fit(cmd, **kwargs):
        calls.append(cmd)
        log = tmp_path / "runs" / "arm-seed0" / "version_0"
        log.mkdir(parents=True, exist_ok=True)
        (log / "metrics.csv").write_text(f"step,val/reward\n0,{0.1 * len(calls)}\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(runner.subprocess, "run", fake_fit)
    run = runner.Run("arm", 0, (f"--config={overlay}",))
    first = runner._fit(run, tmp_path / "runs", 60)
    again = runner._fit(run, tmp_path / "runs", 60)
    assert len(calls) == 1 and again == first  # read back
    overlay.write_text("model: {lr: 2.0e-4}\n")
    edited = runner._fit(run, tmp_path / "runs", 60)
    assert len(calls) == 2 and edited[0]["val/reward"] == pytest.approx(0.2)  # an edited config reruns
    other = runner._fit(runner.Run("arm", 0, (f"--config={overlay}", "--model.lr=1")), tmp_path / "runs", 60)
    assert len(calls) == 3 and other[0]["val/reward"] == pytest.approx(0.3)  # so does another command


@pytest.mark.parametrize("arm", ["GRPO", "GSPO", "GMPO", "RSPO", "RSPO+R3"])
def test_rspo_study_arms_run_their_algorithms_own_settings(arm, capsys):
    """Each arm runs its own class's defaults (what the study's table claims): the switched classes do not
    carry GRPO's clip over, and GRPO itself runs 0.2 / 0.2, not the quickstart's clip_high 0.28."""
    import inspect

    from lit_moe_rl import algorithms

    study = _rspo()
    with pytest.raises(SystemExit):
        main(["fit", *(a.replace("--config=", f"--config={ROOT}/") for a in study.BASE), *study.ARMS[arm],
              "--print_config"])  # fmt: skip
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["algorithm"]["init_args"]
    defaults = inspect.signature(getattr(algorithms, arm.split("+")[0]).__init__).parameters
    assert {k: resolved[k] for k in ("clip_low", "clip_high")} == {
        k: defaults[k].default for k in ("clip_low", "clip_high")
    }
