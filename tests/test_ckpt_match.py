"""A checkpoint must match the run it resumes (issue 19.2): another model size, LoRA where the checkpoint
has none (or none where it has), another dtype or algorithm is refused with one line naming both, before
any weight is loaded; the optimiser and batching settings may change, and the config's values are used."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import read_metrics, run_fit

LORA = '--model.lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]}'
ONE_STEP = ["--trainer.limit_val_batches=0", "--data.num_train=6"]


def _refused(tmp_path, capsys, *extra: str, family_config: str = "") -> str:
    """Resume the 1-step run under ``tmp_path`` with ``extra``; return the error line (exit 2)."""
    args = [*ONE_STEP, "--ckpt_path=last", *extra]
    if family_config:
        args.append(f"--model.config={family_config}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_fit(tmp_path, *args, steps=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err, err
    return err[-1]


@pytest.fixture
def full_run(tmp_path):
    run_fit(tmp_path, *ONE_STEP, steps=1)
    return tmp_path


def test_a_checkpoint_of_another_model_size_is_refused(full_run, capsys):
    line = _refused(full_run, capsys, family_config='{"family": "qwen3_moe", "hidden_size": 48}')
    assert line.startswith("lit-moe-rl: error: model: --ckpt_path ")
    assert "holds another model: model.embed_tokens.weight is (64, 32) there and (64, 48)" in line


def test_a_full_checkpoint_into_a_lora_config_is_refused(full_run, capsys):
    line = _refused(full_run, capsys, LORA)
    assert "model.lora: --ckpt_path " in line
    assert "was trained with full fine-tuning (no LoRA), this run sets LoRA {'rank': 4" in line


def test_another_algorithm_or_dtype_is_refused(full_run, capsys):
    line = _refused(full_run, capsys, "--model.algorithm=lit_moe_rl.algorithms.GSPO")
    assert "model.algorithm: --ckpt_path " in line and "was trained with GRPO(" in line
    assert "this run sets GSPO(" in line
    line = _refused(
        full_run, capsys, "--model.algorithm=lit_moe_rl.algorithms.GRPO", "--model.algorithm.clip_high=0.5"
    )
    assert "was trained with GRPO(clip_high=0.2), this run sets GRPO(clip_high=0.5)" in line
    assert "model.dtype: " in _refused(full_run, capsys, "--model.dtype=bfloat16")


def test_a_lora_checkpoint_into_a_full_config_is_refused(tmp_path, capsys):
    run_fit(tmp_path, *ONE_STEP, LORA, steps=1)
    line = _refused(tmp_path, capsys)
    assert "was trained with LoRA {'rank': 4" in line and "this run sets full fine-tuning (no LoRA)" in line


def test_a_matching_resume_warns_that_the_checkpoints_learning_rate_stays(full_run):
    """The optimiser's state (and its learning rate) is restored: a new ``model.lr`` is accepted with a
    warning naming the value that stays, and the logged lr is the checkpoint's."""
    (last,) = full_run.rglob("last.ckpt")
    with pytest.warns(
        UserWarning, match=r"model.lr: the checkpoint's optimizer state keeps lr=0.001 .* lr=0.0003 is"
    ):
        rows = read_metrics(run_fit(full_run, *ONE_STEP, f"--ckpt_path={last}", "--model.lr=3e-4", steps=2))
    lrs = [float(r["policy/lr"]) for r in rows if r.get("policy/lr")]
    assert lrs == [pytest.approx(1e-3)]
    assert torch.load(last, map_location="cpu", weights_only=True)["run_identity"]["lora"] is None


def test_a_checkpoint_written_before_the_record_is_still_checked_by_its_weights(full_run, capsys):
    (last,) = full_run.rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    del ckpt["run_identity"]  # as checkpoints were written before
    torch.save(ckpt, last)
    line = _refused(full_run, capsys, family_config='{"family": "qwen3_moe", "hidden_size": 48}')
    assert "holds another model: model.embed_tokens.weight is (64, 32) there and (64, 48)" in line
