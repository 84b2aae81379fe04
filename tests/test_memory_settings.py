"""The memory settings' bad inputs (docs/errors.md, "Memory settings"): one line naming the setting,
exit status 2, before the first rollout."""

from __future__ import annotations

import pytest

from lit_moe_rl.cli import main
from tests.helpers import ROOT
from tests.test_bad_inputs import _error

FSDP2_ONE = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=1",
    "--trainer.strategy.tensor_parallel_size=1",
]
QUIET = ["--data.num_val=0", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]


pytestmark = pytest.mark.usefixtures("restored_environ")  # tests/conftest.py


CASES = [
    (["--model.compute_dtype=bfloat16"], "model.compute_dtype: needs FSDP2"),
    ([*FSDP2_ONE, "--model.compute_dtype=bfloat16", "--trainer.precision=bf16-true"],
     "model.compute_dtype: trainer.precision bf16-true casts the master weights to low precision"),
    ([*FSDP2_ONE, "--model.compute_dtype=bfloat16", "--model.dtype=bfloat16"],
     "model.compute_dtype: the master weights must be float32 (model.dtype is bfloat16)"),
    ([*FSDP2_ONE, "--model.rollout_weights=unshard", "--rollout.engine.dtype=bfloat16"],
     "rollout.engine.dtype: bfloat16 keeps a resident copy of the weights in the engine"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "expected"), CASES, ids=[c[1][:40] for c in CASES])
def test_memory_setting_errors_are_one_line(capsys, tmp_path, extra, expected):
    assert expected in _error(capsys, tmp_path, *QUIET, *extra)


def test_plan_of_a_missing_file_is_one_line(capsys, tmp_path):
    line = _error(capsys, tmp_path, "plan", "--config", str(tmp_path / "missing.yaml"), raw=True)
    assert line == f"lit-moe-rl: error: plan --config: {tmp_path / 'missing.yaml'} is not a file"


def test_help_lists_plan(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "plan" in capsys.readouterr().out
    assert (ROOT / "configs" / "qwen3_30b_a3b_lora_r3.yaml").is_file()
