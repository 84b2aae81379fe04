"""Settings that used to be ignored silently or to end in a traceback (issue "a newcomer's first hour"):
each now stops with one line naming the setting (exit 2), warns, or works; see docs/errors.md."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import transformers
import yaml

from lit_moe_rl.cli import main
from tests.helpers import ROOT, read_metrics, run_fit, train_rows
from tests.test_bad_inputs import ASSET, _error

CASES = [
    # (extra args, text the one line must contain)
    (["--data.path=rows.jsonl"], "data.path: 'rows.jsonl' is set but data.source is 'countdown'"),
    (["--optimizer=torch.optim.SGD"], "optimizer: not a setting of lit-moe-rl; the RL module builds AdamW"),
    (["--lr_scheduler=torch.optim.lr_scheduler.StepLR"], "lr_scheduler: not a setting of lit-moe-rl"),
    (["--model.mini_batches=100"], "model.mini_batches: 100 updates per rollout, but a rollout has 8 sequences"),
    (["--model.algorithm=GSPO", "--model.algorithm.clip_low=5"], "model.algorithm.clip_low: GSPO clips"),
    (["--trainer.val_check_interval=0"], "trainer.val_check_interval: must be > 0"),
    (["--trainer.precision=64-true"], "trainer.precision: '64-true' is not supported"),
    (["--model.dtype=float16"], "model.dtype: 'float16' on the CPU"),
    (['--model.config={"family": "qwen3_moe", "num_experts_per_tok": 16}'],
     "model.config: num_experts_per_tok 16 is more than the 8 experts"),
    (['--model.config={"family": "qwen3_moe", "hidden_size": 33}'],
     "model.config: hidden_size 33 is not divisible by num_attention_heads 2"),
    (['--model.config={"family": "qwen3_moe", "hidden_size": 30}'], "= 15, an odd head size"),
    (['--model.config={"family": "mixtral", "num_attention_heads": 4, "num_key_value_heads": 3}'],
     "model.config: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (["--trainer.enable_checkpointing=false", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"],
     "trainer.enable_checkpointing: Trainer was configured with enable_checkpointing=False but found ModelCheckpoint"),
    (["--rollout.reward=lit_moe_rl.rewards.countdown"],
     "rollout.reward: 'lit_moe_rl.rewards.countdown' is a module, not a function"),
    (["--rollout.reward=my_reward.py"], "rollout.reward: 'my_reward.py' names a file but no function in it"),
    (['--trainer.callbacks+={"class_path": "lit_moe_rl.callbacks.ReferenceKLCallback", '
      '"init_args": {"pretrained": "/nope/ref"}}', "--model.algorithm=GRPO", "--model.algorithm.kl_coef=0.1"],
     "ReferenceKLCallback.pretrained: '/nope/ref' is not a local directory"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "needle"), CASES, ids=lambda v: str(v)[:60])
def test_setting_is_one_line(capsys, tmp_path, extra, needle):
    assert needle in _error(capsys, tmp_path, *extra)


def test_optimizer_and_scheduler_are_not_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


def test_duplicate_yaml_key_names_the_file_and_both_lines(capsys, tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("model:\n  lr: 0.1\n  mini_batches: 1\n  lr: 0.2\n")
    line = _error(capsys, tmp_path, f"--config={cfg}")
    assert f"--config {cfg}: key 'lr' appears twice in one mapping (lines 2 and 4)" in line


def test_model_folder_without_tokenizer_files(capsys, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(ROOT / ASSET, folder, ignore=shutil.ignore_patterns("*token*", "vocab*", "special*"))
    line = _error(capsys, tmp_path, f"--model.pretrained={folder}", "--model.config=null")
    assert f"model.pretrained: {folder} has no tokenizer files" in line


def test_dense_bert_folder_is_refused(capsys, tmp_path):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    line = _error(capsys, tmp_path, f"--model.pretrained={tmp_path / 'bert'}", "--model.config=null")
    assert "holds a BertModel, not a causal LM" in line


def test_sft_rows_without_solution(capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "{i} + {i} =", "answer": "{2 * i}"}}\n' for i in range(16)))
    line = _error(capsys, tmp_path, "sft", "--trainer.max_steps=1", "--trainer.accelerator=cpu",
                  f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                  '--model.config={"family": "qwen3_moe"}', "--data.source=file", f"--data.path={rows}",
                  "--data.num_val=4", "--data.batch_size=4", raw=True)  # fmt: skip
    assert (
        "data: sft trains on each row's 'solution' field" in line
        and "training row 0 has only 'prompt'" in line
    )


def test_checkpointing_off_needs_no_callback_edit(tmp_path):
    """enable_checkpointing=false drops the default checkpoint callback (Lightning refused it before)."""
    run_fit(tmp_path, "--trainer.enable_checkpointing=false", steps=1)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_callbacks_written_as_a_mapping_is_one_callback(tmp_path):
    callback = '{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}'
    metrics = run_fit(tmp_path, f"--trainer.callbacks={callback}", steps=1)
    assert any("lr-AdamW" in key for key in read_metrics(metrics)[0])


def test_huge_rewards_still_update(tmp_path):
    """Rewards of +-1e30 used to overflow the float32 group std and skip every update."""
    reward = tmp_path / "huge.py"
    reward.write_text("def huge(completion, sample):\n    return 1e30 if len(completion) % 2 else -1e30\n")
    rows = train_rows(run_fit(tmp_path, f"--rollout.reward={reward}:huge", steps=2))
    assert rows[-1]["policy/skipped_steps"] == 0
    assert all(abs(r["reward/mean"]) <= 1e30 for r in rows)


def test_unknown_characters_and_long_prompts_warn_once():
    from lit_moe_rl.policy import char_tokenizer
    from lit_moe_rl.rollout import prompts

    tok = char_tokenizer()
    prompts._WARNED.clear()
    with pytest.warns(
        UserWarning, match=r"data: prompt 1 of a batch has characters the tokenizer does not know \('🙂'\)"
    ):
        prompts.prompt_token_rows(tok, ["1 + 2", "3 🙂 4"], max_prompt_len=None)
    with pytest.warns(UserWarning, match="needs 12 positions, but the model has max_position_embeddings 10"):
        prompts.encode_prompts(tok, ["1234"], max_prompt_len=None, max_new_tokens=8, max_positions=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        prompts.prompt_token_rows(tok, ["🙂"], max_prompt_len=None)
        prompts.encode_prompts(tok, ["1234"], max_prompt_len=None, max_new_tokens=8, max_positions=10)
    prompts._WARNED.clear()


def _algorithm(capsys, *extra: str) -> tuple[dict, str]:
    with pytest.raises(SystemExit):
        main(["fit", f"--config={ROOT / 'configs' / 'quickstart.yaml'}", *extra, "--print_config"])
    captured = capsys.readouterr()
    return yaml.safe_load(captured.out)["model"]["algorithm"], captured.err


@pytest.mark.parametrize(
    ("name", "clip"), [("GSPO", (3e-4, 4e-4)), ("GMPO", (0.4, 0.4)), ("RSPO", (0.4, 0.4))]
)
def test_switching_algorithm_starts_from_its_defaults(capsys, name, clip):
    from lit_moe_rl.cli import algorithm_switch

    algorithm_switch._NOTED.clear()
    algorithm, err = _algorithm(capsys, f"--model.algorithm={name}")
    assert (algorithm["init_args"]["clip_low"], algorithm["init_args"]["clip_high"]) == clip
    assert f"model.algorithm: GRPO -> {name} starts from {name}'s defaults: clip_low 0.2 -> {clip[0]!r}, " \
        f"clip_high 0.28 -> {clip[1]!r}" in err  # fmt: skip


def test_init_args_after_the_switch_are_kept(capsys):
    algorithm, _ = _algorithm(capsys, "--model.algorithm=GSPO", "--model.algorithm.clip_low=1e-3")
    assert (algorithm["init_args"]["clip_low"], algorithm["init_args"]["clip_high"]) == (1e-3, 4e-4)
    algorithm, _ = _algorithm(capsys, "--model.algorithm.kl_coef=0.5")  # same class: the config's values stay
    assert algorithm["init_args"]["clip_high"] == 0.28 and algorithm["init_args"]["kl_coef"] == 0.5


def test_finished_checkpoint_exports_to_a_hugging_face_folder(tmp_path, caplog):
    """README "Export": fit with the run's config, --ckpt_path and HFExportCallback; the loop is done, so
    the restored policy is written by on_fit_end (before: nothing was exported and nothing said)."""
    from safetensors.torch import load_file

    run_fit(tmp_path, steps=1)
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out = tmp_path / "hf"
    run_fit(tmp_path, f"--ckpt_path={ckpt}", "--trainer.callbacks+=lit_moe_rl.callbacks.HFExportCallback",
            f"--trainer.callbacks.dirpath={out}", steps=1)  # fmt: skip
    assert f"(step 1) as a Hugging Face folder: {out}" in caplog.text
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(out / "model.safetensors")
    name = next(k for k in exported if k.endswith("embed_tokens.weight"))
    assert torch.equal(exported[name], state[f"policy.{name}"])


def test_sft_help_says_sft(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lit-moe-rl", "sft", "--help"])  # as the console script sees it
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: lit-moe-rl sft ") and " fit " not in captured.out.splitlines()[0]
    assert "Supervised warm start (lit-moe-rl sft)" in captured.out
    assert "LightningCLI's args parameter" not in captured.err


def test_a_skipped_update_is_said_once():
    from types import SimpleNamespace

    from lit_moe_rl.learner.update import note_skipped

    module = SimpleNamespace(optimizer_step=7, skip_noted=False)
    with pytest.warns(
        UserWarning, match="model: optimizer step 7 skipped: its loss or gradient norm is not finite"
    ):
        note_skipped(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        note_skipped(module)
