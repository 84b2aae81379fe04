"""Shared helpers for end-to-end CLI tests: run ``lit-moe-rl`` in-process and read its metrics."""

from __future__ import annotations

import csv
import glob
import os
import signal
from pathlib import Path

from lit_moe_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.template=compact",
    "--data.num_train=64",
    "--data.num_val=8",
    "--data.val_batch_size=8",
    "--data.batch_size=2",
    "--data.min_numbers=3",
    "--data.max_numbers=3",
    "--data.max_number=20",
    "--data.max_target=100",
    "--rollout.group_size=4",
    "--rollout.reward=lit_moe_rl.rewards.countdown.CountdownReward",
    "--rollout.reward.format=plain",
    "--rollout.engine=lit_moe_rl.rollout.engine.HFEngine",
    "--rollout.engine.max_new_tokens=6",
]


def run_fit(tmp_path: Path, *extra: str, steps: int = 2, family: str = "qwen3_moe") -> Path:
    """A short ``fit`` of a tiny random ``family`` model; returns the run's metrics.csv."""
    save_dir = tmp_path / "runs"
    args = [
        "fit",
        f"--trainer.max_steps={steps}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.default_root_dir={tmp_path}",
        f'--model.config={{"family": "{family}"}}',
        "--model.lr=1e-3",
        *TINY_ARGS,
        *extra,
    ]
    main(args)
    return latest_metrics(save_dir)


def save_dense_model(path: Path) -> Path:
    """A tiny dense (no MoE layer) Qwen3 with the char tokenizer, saved at ``path``."""
    import transformers

    from lit_moe_rl.policy import char_tokenizer

    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def latest_metrics(save_dir: Path) -> Path:
    files = sorted(glob.glob(f"{save_dir}/**/metrics.csv", recursive=True), key=os.path.getmtime)
    assert files, f"no metrics.csv under {save_dir}"
    return Path(files[-1])


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def train_rows(path: Path) -> list[dict[str, float]]:
    """Rows of training-step metrics, values as floats (empty cells dropped)."""
    rows = [r for r in read_metrics(path) if r.get("reward/mean")]
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def peak_rss_mib(script: str) -> list[float]:
    """Run ``script`` in a fresh single-threaded Python; each line it prints is ``<label> <peak RSS MiB>``.
    Returns the peaks in order (``ru_maxrss`` is per process, so a fresh one isolates the measurement)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(line.split()[1]) for line in out.stdout.strip().splitlines()]


def default_sigint() -> None:
    """``preexec_fn`` of a child that must take Ctrl-C: SIGINT back to its default action. A test suite
    started as a background job of a non-interactive shell (``cmd &``) inherits SIGINT ignored, and a
    Python started with SIGINT ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
