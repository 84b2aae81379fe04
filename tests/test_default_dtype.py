"""``precision: bf16-true`` makes bf16 Lightning's default dtype inside the training step: a tensor built
without an explicit dtype there is bf16. RSPO's quantiles crashed on it (``q tensor must be same dtype
as the input``); a float count or schedule value silently lost precision."""

import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import run_fit, train_rows  # noqa: E402

# Factories whose result takes the default dtype when no dtype is given and the data are floats.
FLOAT_FACTORIES = {"zeros", "ones", "full", "empty", "rand", "randn", "linspace", "logspace"}
VALUE_FACTORIES = {"tensor", "as_tensor"}


def _default_dtype_calls(path: Path) -> list[str]:
    """``file:line`` of ``torch.<factory>(...)`` calls that may produce a default-dtype float tensor."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        if any(k.arg == "dtype" for k in node.keywords):
            continue
        if func.attr in FLOAT_FACTORIES or func.attr in VALUE_FACTORIES and _has_float(node.args):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.{func.attr}")
    return found


def _has_float(args: list[ast.expr]) -> bool:
    """Whether a literal float or a ``float(...)`` call appears in ``args``."""
    for arg in args:
        for node in ast.walk(arg):
            if isinstance(node, ast.Constant) and isinstance(node.value, float):
                return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float":
                return True
    return False


def test_no_float_tensor_takes_the_default_dtype():
    calls = [c for path in sorted((ROOT / "lit_moe_rl").rglob("*.py")) for c in _default_dtype_calls(path)]
    assert not calls, "give these an explicit dtype:\n" + "\n".join(calls)


def test_shift_stats_quantiles_under_a_bf16_default_dtype():
    from lit_moe_rl.routing.shift import router_shift, shift_stats

    logp = torch.log(torch.tensor([[[[0.5, 0.25]], [[0.4, 0.3]]]], dtype=torch.float32))  # [1, 2, 1, 2]
    shift = router_shift(logp, logp - 0.1, floor=0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true precision does in training_step
    try:
        stats = shift_stats(shift, None, floor=0.0)
    finally:
        torch.set_default_dtype(previous)
    assert stats["shift_p90"].dtype == torch.float32
    assert stats["shift_p90"].item() == pytest.approx(0.1, abs=1e-6)  # |Δ log r| = 0.1 everywhere
    assert stats["gamma_p10"].item() == pytest.approx(torch.exp(torch.tensor(-0.1)).item(), abs=1e-6)


@pytest.mark.parametrize("algorithm", ["RSPO", "GRPO"])
def test_bf16_true_fit_runs(tmp_path, algorithm):
    """A CLI fit under ``precision: bf16-true`` (the GPU check's setting) on CPU: RSPO with R3 replay
    and validation (the separate π_old pass), GRPO on the fused path."""
    extra = [
        "--trainer.precision=bf16-true",
        "--model.dtype=bfloat16",
        f"--model.algorithm=lit_moe_rl.algorithms.{algorithm}",
        "--trainer.val_check_interval=2",
    ]
    if algorithm == "RSPO":
        extra.append("--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback")
    rows = train_rows(run_fit(tmp_path, *extra))
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(r["policy/loss"])) for r in rows)
    if algorithm == "RSPO":
        assert all(0.0 < r["rspo/gamma_p10"] <= 1.0 for r in rows)
