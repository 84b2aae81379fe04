"""End-to-end ``lit-moe-rl fit`` runs on tiny random MoE models, bad-input errors, resume and export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lit_moe_rl.tiny import FAMILIES
from tests.helpers import latest_metrics, read_metrics, run_fit, save_dense_model, train_rows

LOGGED = [
    "reward/mean",
    "reward/std",
    "reward/errors",
    "rollout/response_length",
    "rollout/truncated_frac",
    "policy/loss",
    "policy/clipfrac_low",
    "policy/clipfrac_high",
    "policy/ppo_kl",
    "policy/entropy",
    "policy/grad_norm",
    "policy/skipped_steps",
    "perf/rollout_s",
    "perf/update_s",
    "perf/tokens_per_s",
    "mismatch/train_infer_kl",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_step_fit_each_family(tmp_path, family):
    metrics = run_fit(tmp_path, family=family)
    rows = train_rows(metrics)
    assert len(rows) == 2
    for key in LOGGED:
        assert all(math.isfinite(r[key]) for r in rows), key
    # first update of an on-policy step: the policy is pi_old, so the ratio is exactly 1
    assert rows[0]["policy/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    val = [r for r in read_metrics(metrics) if r.get("val/reward")]
    assert [int(r["step"]) for r in val][0] == 0  # pre-training baseline logged at step 0


def test_weights_change_and_metrics_are_consistent(tmp_path):
    rows = train_rows(run_fit(tmp_path, steps=3, family="qwen3_moe"))
    assert all(0.0 <= r["rollout/truncated_frac"] <= 1.0 for r in rows)
    assert all(1.0 <= r["rollout/response_length"] <= 6.0 for r in rows)
    assert all(r["policy/grad_norm"] > 0 for r in rows)


def _error_of(capsys, tmp_path, *extra, family="qwen3_moe"):
    with pytest.raises(SystemExit) as exc:
        run_fit(tmp_path, *extra, family=family)
    assert exc.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rollout.group_size=1"], "rollout.group_size"),
        (["--rollout.engine.max_new_tokens=0"], "max_new_tokens"),
        (["--model.pretrained=/nonexistent/model"], "model.pretrained"),
        (["--model.pretrained=Qwen/Qwen3-30B-A3B"], "need network"),
        (["--model.mini_batches=0"], "model.mini_batches"),
        (["--model.correction=bogus"], "correction"),
        (["--model.no_such_key=1"], "no_such_key"),
        (["--model.algorithm=lit_moe_rl.algorithms.NoSuchAlgo"], "NoSuchAlgo"),
        (["--data.source=file", "--data.path=/nonexistent.jsonl"], "data.path"),
    ],
)
def test_bad_input_stops_with_one_line_naming_the_setting(capsys, tmp_path, extra, needle):
    err = _error_of(capsys, tmp_path, *extra)
    assert needle in err


def test_bad_input_error_is_one_line(capsys, tmp_path):
    err = _error_of(capsys, tmp_path, "--rollout.group_size=1")
    assert err.strip().count("\n") == 0
    assert err.startswith("lit-moe-rl: error: rollout.group_size")


def test_empty_dataset_is_an_error(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _error_of(capsys, tmp_path, "--data.source=file", f"--data.path={empty}")
    assert "data.path" in err


def test_dense_model_with_router_shift_is_an_error(capsys, tmp_path):
    dense = save_dense_model(tmp_path / "dense")
    with pytest.raises(SystemExit):
        run_fit(
            tmp_path, f"--model.pretrained={dense}", "--model.config=null", "--model.track_router_shift=true"
        )
    assert "no MoE layer" in capsys.readouterr().err


def test_nan_loss_skips_the_update_and_keeps_weights(tmp_path, monkeypatch):
    from lit_moe_rl.learner import Learner

    original = Learner.micro_batch_loss
    seen = {}

    def nan_loss(self, micro, capture, **norms):
        loss, stats = original(self, micro, capture, **norms)
        seen.setdefault("before", {k: v.detach().clone() for k, v in self.policy.state_dict().items()})
        seen["module"] = self
        return loss * float("nan"), stats

    monkeypatch.setattr(Learner, "micro_batch_loss", nan_loss)
    rows = train_rows(run_fit(tmp_path, steps=2))
    assert rows[-1]["policy/skipped_steps"] == 2.0
    after = seen["module"].policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())


CKPT_EVERY_2 = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=2",
    "--trainer.callbacks.save_last=true",
    "--trainer.callbacks.save_top_k=0",
]


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    full = train_rows(run_fit(tmp_path / "full", steps=4))
    first = tmp_path / "part"
    run_fit(first, *CKPT_EVERY_2, steps=2)
    last = next(first.rglob("last.ckpt"))
    resumed = train_rows(run_fit(first, f"--ckpt_path={last}", steps=4))
    assert len(resumed) == 2
    for key in ("reward/mean", "policy/loss", "policy/grad_norm", "policy/entropy"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[2:]], rel=1e-5, abs=1e-7), key


def test_export_round_trips_through_from_pretrained(tmp_path):
    out = tmp_path / "hf"
    export = [
        "--trainer.callbacks+=lit_moe_rl.callbacks.HFExportCallback",
        f"--trainer.callbacks.dirpath={out}",
    ]
    run_fit(tmp_path, *CKPT_EVERY_2, *export)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    trained = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)["state_dict"]
    exported = model.state_dict()
    assert model.config.model_type == "qwen3_moe"
    for name, value in trained.items():
        torch.testing.assert_close(exported[name.removeprefix("policy.")], value, rtol=0, atol=0)


def test_metrics_file_is_written_under_save_dir(tmp_path):
    metrics = run_fit(tmp_path)
    assert latest_metrics(tmp_path / "runs") == metrics


def test_wandb_offline_logs_metrics_and_a_samples_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lit_moe_rl.cli import main
    from tests.helpers import TINY_ARGS

    main([
        "fit", "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.offline=true",
        "--trainer.callbacks+=lit_moe_rl.callbacks.SampleTableCallback",
        "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.num_samples=4",
        '--model.config={"family": "qwen3_moe"}', *TINY_ARGS,
    ])  # fmt: skip
    runs = list(tmp_path.rglob("run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    lines = next(tmp_path.rglob("samples.jsonl")).read_text().splitlines()
    assert len(lines) == 8  # 4 samples x 2 steps
    assert {"step", "prompt", "completion", "reward", "advantage"} <= set(json.loads(lines[0]))


def test_avg_at_k_validation_and_dynamic_sampling(tmp_path):
    metrics = run_fit(tmp_path, "--rollout.val_samples=3", "--model.algorithm=lit_moe_rl.algorithms.DAPO")
    val = [float(r["val/reward"]) for r in read_metrics(metrics) if r.get("val/reward")]
    assert val and all(0.0 <= v <= 1.0 for v in val)
    rows = train_rows(metrics)
    assert all(0.0 <= r["rollout/kept_frac"] <= 1.0 for r in rows)


def test_validate_subcommand_reports_held_out_reward(tmp_path, capsys):
    from lit_moe_rl.cli import main
    from tests.helpers import TINY_ARGS

    args = [a for a in TINY_ARGS if "progress_bar" not in a and "model_summary" not in a]
    main(["validate", f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          '--model.config={"family": "olmoe"}', *args])  # fmt: skip
    assert "val/reward" in capsys.readouterr().out


def constant_reward(completion: str, sample: dict) -> float:
    return 0.5


def test_dapo_dropping_every_group_still_ends_the_run(tmp_path):
    rows = train_rows(
        run_fit(
            tmp_path,
            "--model.algorithm=lit_moe_rl.algorithms.DAPO",
            "--rollout.reward=tests.test_cli:constant_reward",
        )
    )
    assert len(rows) == 2
    assert [r["rollout/kept_frac"] for r in rows] == [0.0, 0.0]
    assert rows[-1]["policy/skipped_steps"] == 2.0


def test_fused_old_pass_matches_a_separate_one(tmp_path):
    """With one mini-batch, pi_old read off the update forward equals a separate recompute."""
    fused = train_rows(run_fit(tmp_path / "auto", steps=3))
    separate = train_rows(run_fit(tmp_path / "always", "--model.old_logp_pass=always", steps=3))
    for key in (
        "reward/mean",
        "policy/loss",
        "policy/grad_norm",
        "policy/entropy",
        "mismatch/train_infer_kl",
    ):
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in separate], rel=1e-4, abs=1e-6), key
    assert all(r["policy/ppo_kl"] == 0.0 for r in fused)


def test_reference_kl_term_is_logged_and_trains(tmp_path):
    rows = train_rows(
        run_fit(
            tmp_path,
            "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
            "--model.algorithm=lit_moe_rl.algorithms.GRPO",
            "--model.algorithm.kl_coef=0.1",
            steps=3,
        )
    )
    assert rows[0]["ref/kl"] == pytest.approx(0.0, abs=1e-7)  # pi_old is the reference before any step
    assert rows[-1]["ref/kl"] > 0.0
    assert all("policy/kl_loss" in r for r in rows)


def test_kl_term_without_reference_fails_before_training(capsys, tmp_path):
    err = _error_of(
        capsys, tmp_path, "--model.algorithm=lit_moe_rl.algorithms.GRPO", "--model.algorithm.kl_coef=0.1"
    )
    assert "ReferenceKLCallback" in err


def test_router_aux_loss_is_off_unless_asked_and_then_trains(tmp_path):
    off = train_rows(run_fit(tmp_path / "off"))
    assert "policy/aux_loss" not in off[0]
    on = train_rows(run_fit(tmp_path / "on", "--model.router_aux_loss_coef=0.01"))
    assert all(r["policy/aux_loss"] > 0 for r in on)


def test_router_aux_loss_on_a_family_without_one_is_an_error(capsys, tmp_path):
    err = _error_of(capsys, tmp_path, "--model.router_aux_loss_coef=0.01", family="deepseek_v3")
    assert "model.router_aux_loss_coef" in err
