"""What docs/data_and_rewards.md and callbacks/README.md tell a user to run, run here."""

from __future__ import annotations

import hashlib
import math

import pytest
import yaml

from lit_moe_rl.cli import main
from tests.helpers import ROOT, latest_metrics, run_fit, train_rows

# rollout.yaml is a config file; checkpoint.yaml is the CLI's default, pasted into a list to change it
SNIPPETS = sorted(
    p for p in (ROOT / "callbacks").glob("*.yaml") if p.name not in ("rollout.yaml", "checkpoint.yaml")
)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_each_callback_snippet_is_accepted_by_callbacks_plus(tmp_path, snippet):
    rows = train_rows(run_fit(tmp_path, f"--trainer.callbacks+={snippet}", steps=1))
    assert len(rows) == 1 and math.isfinite(rows[0]["policy/loss"])


def test_checkpoint_snippet_pasted_into_a_callbacks_list_replaces_the_default(tmp_path):
    item = yaml.safe_load((ROOT / "callbacks" / "checkpoint.yaml").read_text())
    item["init_args"]["every_n_train_steps"] = 1
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [item]}}))
    rows = train_rows(run_fit(tmp_path, f"--config={config}", steps=2))
    assert len(rows) == 2
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["last.ckpt"]


def test_rollout_snippet_is_a_config_file(tmp_path):
    rows = train_rows(
        run_fit(tmp_path, f"--config={ROOT / 'callbacks/rollout.yaml'}", *_tiny_rollout(), steps=1)
    )
    assert len(rows) == 1


def _tiny_rollout() -> list[str]:  # the snippet's production sizes, cut back for a tiny model
    return [
        "--rollout.group_size=4",
        "--rollout.reward=lit_moe_rl.rewards.countdown.CountdownReward",
        "--rollout.reward.format=plain",
        "--rollout.engine.max_new_tokens=6",
    ]


def test_worked_example_own_prompts_and_reward_file(tmp_path, monkeypatch):
    """docs/data_and_rewards.md: the sums example (JSONL rows + a reward file) trains end to end."""
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository, as in the docs
    main(
        [
            "fit",
            "--config=configs/quickstart.yaml",
            "--config=examples/sums/config.yaml",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    rows = train_rows(latest_metrics(tmp_path))
    assert len(rows) == 2
    assert all(r["reward/errors"] == 0 for r in rows)  # the reward found its "answer" field every time
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)


def test_reward_by_file_path_scores_in_worker_processes():
    from lit_moe_rl.rewards import resolve_reward
    from lit_moe_rl.rewards.workers import RewardScorer

    fn = resolve_reward(str(ROOT / "examples/sums/reward.py") + ":exact_answer")
    scorer = RewardScorer(fn, "process", num_workers=1)
    try:
        scores, failures = scorer.score(["7", "8", "x"], [{"answer": 7}] * 3, timeout_s=60)
    finally:
        scorer.close()
    assert scores.tolist() == pytest.approx([1.0, 0.1, 0.0]) and not failures


def test_sft_exports_to_the_run_folder_and_leaves_the_shipped_model_alone(tmp_path):
    asset = ROOT / "lit_moe_rl/assets/countdown-tiny-moe/model.safetensors"
    before = hashlib.sha256(asset.read_bytes()).hexdigest()
    main(
        [
            "sft",
            f"--config={ROOT / 'configs/quickstart_sft.yaml'}",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--data.num_train=64",
            "--data.num_val=8",
            "--data.val_batch_size=8",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == before
    exported = list(tmp_path.rglob("hf_model/config.json"))
    assert len(exported) == 1 and (exported[0].parent / "model.safetensors").is_file()
