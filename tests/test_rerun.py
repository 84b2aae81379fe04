"""A second run into the same folder (issue 19.3): ``trainer.logger=false`` twice, or a fixed
``logger.version``, stopped on SaveConfigCallback's existing ``config.yaml``. The config is versioned with
the run: an earlier, different one is kept as ``config.1.yaml`` with one line saying so."""

from __future__ import annotations

import logging

import yaml

from lit_moe_rl.cli import main
from tests.helpers import TINY_ARGS


def _fit(root, *extra: str) -> None:
    main(["fit", *TINY_ARGS, '--model.config={"family": "qwen3_moe"}', f"--trainer.default_root_dir={root}",
          "--trainer.limit_val_batches=0", *extra])  # fmt: skip


def test_rerun_without_a_logger_keeps_the_earlier_config_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _fit(tmp_path, "--trainer.logger=false", "--trainer.max_steps=1")
    _fit(tmp_path, "--trainer.logger=false", "--trainer.max_steps=2", "--ckpt_path=last")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((tmp_path / "config.1.yaml").read_text())["trainer"]["max_steps"] == 1
    said = [r.getMessage() for r in caplog.records if "held an earlier run's config" in r.getMessage()]
    assert said == [f"lit-moe-rl: {tmp_path / 'config.yaml'} held an earlier run's config: kept as config.1.yaml; "
                    "config.yaml is this run's"]  # fmt: skip


def test_the_same_config_twice_into_a_fixed_logger_version_runs_and_keeps_one_file(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fixed = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=fixed"]
    _fit(tmp_path, *fixed, "--trainer.max_steps=1")
    _fit(tmp_path, *fixed, "--trainer.max_steps=1")
    folder = tmp_path / "lightning_logs" / "fixed"
    assert sorted(p.name for p in folder.glob("config*.yaml")) == ["config.yaml"]
    assert not [r for r in caplog.records if "held an earlier run's config" in r.getMessage()]


def test_two_offline_wandb_runs_into_one_folder(tmp_path, monkeypatch, caplog):
    """W&B's log folder is its save_dir, the same for every run: the second one stopped on config.yaml."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb = ["--trainer.logger=WandbLogger", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    _fit(tmp_path, *wandb, "--trainer.max_steps=1")
    _fit(tmp_path, *wandb, "--trainer.max_steps=2")
    configs = sorted(p.name for p in tmp_path.rglob("config*.yaml") if "wandb" not in p.parts)
    assert configs == ["config.1.yaml", "config.yaml"]
