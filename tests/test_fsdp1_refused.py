"""Lightning's FSDP v1 (``FSDPStrategy``) cannot run this trainer: ``manual_backward`` inside its wrapped
forward fails on the GPU (``Expects BACKWARD_PRE or BACKWARD_POST state``, Lightning #19626, #19685).
It is refused at start-up in one line that points to FSDP2 (``ModelParallelStrategy``)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_fit  # noqa: E402

from lit_moe_rl.errors import SettingsError  # noqa: E402
from lit_moe_rl.module import MoERLModule  # noqa: E402
from lit_moe_rl.parallel.sharding import refuse_fsdp1  # noqa: E402


@pytest.mark.parametrize(
    "strategy",
    [
        "--trainer.strategy=fsdp",
        "--trainer.strategy=fsdp_cpu_offload",
        "--trainer.strategy=lightning.pytorch.strategies.FSDPStrategy",
    ],
)
def test_cli_refuses_fsdp1_in_one_line(tmp_path, capsys, strategy):
    with pytest.raises(SystemExit) as exit_info:
        run_fit(tmp_path, strategy)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("lit-moe-rl: error: trainer.strategy: Lightning's FSDPStrategy (FSDP1)")
    assert "lightning.pytorch.strategies.ModelParallelStrategy" in err


def test_module_setup_refuses_an_fsdp1_instance():
    from lightning.pytorch.strategies import FSDPStrategy

    module = MoERLModule(config={"family": "qwen3_moe"})
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(SettingsError, match="ModelParallelStrategy"):
        module.setup("fit")


@pytest.mark.parametrize(
    "strategy", [None, "auto", "ddp", {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}]
)
def test_other_strategies_pass(strategy):
    refuse_fsdp1(strategy)
