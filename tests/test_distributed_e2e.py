"""2 CPU processes (gloo) through Lightning's own strategies equal 1 process with twice the batch.

Each test runs ``lit-moe-rl fit`` twice in subprocesses: ``--trainer.devices=2`` with ``batch_size: b``
(Lightning launches the second rank) and ``--trainer.devices=1`` with ``2b``. The rank-aware sampler
hands the two ranks the prompts of the single process, ``rollout.seed_per_prompt`` makes their
completions identical, and the global normalisers make the update identical: the logged loss and
gradient norm agree to float rounding and so do the weights after the update.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import ROOT, TINY_ARGS
from tests.test_distributed import free_port

FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.save_distributed_checkpoint=false",  # one last.ckpt to compare
]
R3 = [
    "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
    "--trainer.callbacks.mode=R3",
]


def fit(root: Path, *extra: str, devices: int, batch_size: int, steps: int = 1) -> tuple[list[dict], dict]:
    """Run the CLI in a subprocess; return its training-metric rows and its final weights."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["MASTER_PORT"] = str(free_port())
    args = [
        sys.executable, "-m", "lit_moe_rl.cli", "fit", *TINY_ARGS,
        f"--trainer.devices={devices}", f"--trainer.max_steps={steps}", f"--data.batch_size={batch_size}",
        f"--trainer.logger.init_args.save_dir={root}", f"--trainer.default_root_dir={root}",
        '--model.config={"family": "qwen3_moe"}', "--model.lr=1e-3", "--model.micro_batch_size=3",
        "--data.num_val=0", "--trainer.limit_val_batches=0", "--rollout.seed_per_prompt=true", *extra,
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = glob.glob(f"{root}/**/metrics.csv", recursive=True)
    with open(metrics) as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    (ckpt,) = glob.glob(f"{root}/**/last.ckpt", recursive=True)
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return [r for r in rows if "policy/loss" in r], weights


def assert_same_run(one: tuple[list[dict], dict], two: tuple[list[dict], dict], keys: list[str]) -> None:
    (rows1, weights1), (rows2, weights2) = one, two
    assert len(rows1) == len(rows2) >= 1
    for key in keys:
        # |engine log-prob - trainer log-prob| maxima and means are float rounding themselves: a few
        # float32 ulps of a log-prob near -8 (ulp 4.8e-7), which other shapes round differently
        tol = 4e-6 if "absdiff" in key else 1e-7
        assert rows2[0][key] == pytest.approx(rows1[0][key], rel=1e-5, abs=tol), key
    assert weights1.keys() == weights2.keys()
    # AdamW's first step moves a weight by lr * g / (|g| + eps): where |g| ~ eps (rarely hit embedding
    # rows) it turns float-rounding differences of g into ~1e-3 of the step. 1e-5 is 1% of a step (lr
    # 1e-3); the loss and gradient norm above check the normalisation itself to 1e-5 relative.
    for name, value in weights1.items():
        torch.testing.assert_close(weights2[name], value, rtol=0, atol=1e-5, msg=name)


KEYS = [
    "reward/mean",
    "policy/loss",
    "policy/grad_norm",
    "policy/entropy",
    "policy/clipfrac",
    "policy/ppo_kl",
]


def test_ddp_two_ranks_equal_one_process(tmp_path):
    two = fit(tmp_path / "two", "--trainer.strategy=ddp", devices=2, batch_size=2)
    one = fit(tmp_path / "one", devices=1, batch_size=4)
    assert_same_run(one, two, KEYS)
    assert two[0][0]["policy/grad_norm"] > 0


def test_every_logged_metric_of_two_ranks_equals_one_process(tmp_path):
    """Each statistic reduced by its kind: token and sequence means, extremes, sums, and the quantiles
    and standard deviation from the gathered values (RSPO's γ quantiles, ``reward/std``). One mini-batch:
    with several, each rank shuffles its own rows into mini-batches, so the updates themselves differ
    from one process's (tests/test_distributed.py checks pooled quantiles with hand-worked values)."""
    # One micro-batch per rank holds whole GRPO groups in both runs, so each shared prompt
    # (model.shared_prefix) sums its rows' gradients in the same order: split over micro-batches that differ
    # between the runs, the order differs, and AdamW's first step turns that rounding into up to 7% of a
    # step on embedding rows whose gradient cancels to ~eps (tokens no prompt has; test_ddp_... above
    # covers micro-batches of 3).
    extra = ["--model.algorithm=lit_moe_rl.algorithms.RSPO", "--model.algorithm.kl_coef=0.05",
             "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback", "--model.micro_batch_size=16"]  # fmt: skip
    two = fit(tmp_path / "two", "--trainer.strategy=ddp", *extra, devices=2, batch_size=2)
    one = fit(tmp_path / "one", *extra, devices=1, batch_size=4)
    keys = [k for k in one[0][0] if not k.startswith("perf/") and k not in ("epoch", "step")]
    assert {"rspo/gamma_p10", "rspo/shift_p99", "reward/std", "policy/ratio_max", "ref/kl"} <= set(keys)
    assert set(keys) == {k for k in two[0][0] if not k.startswith("perf/") and k not in ("epoch", "step")}
    assert_same_run(one, two, keys)


def test_fsdp2_two_ranks_with_r3_and_rspo_equal_one_process(tmp_path):
    """FSDP2 (fully_shard per decoder layer) on CPU: generation runs on the full rollout copy (a bf16
    engine), R3 records its routes there and replays them per rank in the sharded forward; RSPO's
    capture runs through the sharded routers; the reference model is sharded like the policy."""
    # One micro-batch per rank, as in the test above: with micro-batches of 3 each run plans its own rows
    # (by length or by GRPO group, batching.micro_plan), so a shared prompt's gradient is summed in
    # another order, and AdamW's first step turns that rounding into a visible step on embedding rows
    # whose gradient cancels to ~eps.
    extra = [
        *R3, "--model.algorithm=lit_moe_rl.algorithms.RSPO", "--rollout.engine.dtype=bfloat16",
        "--model.algorithm.kl_coef=0.05", "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
        "--model.micro_batch_size=16",
    ]  # fmt: skip
    export = [
        "--trainer.callbacks+=lit_moe_rl.callbacks.HFExportCallback",
        f"--trainer.callbacks.dirpath={tmp_path / 'hf'}",
    ]
    two = fit(tmp_path / "two", *FSDP2, *extra, *export, devices=2, batch_size=2)
    one = fit(tmp_path / "one", *extra, devices=1, batch_size=4)
    assert_same_run(one, two, [*KEYS, "mismatch/train_infer_kl", "rspo/gamma_mean", "policy/kl_loss"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    ).state_dict()
    for name, value in two[1].items():  # the sharded policy exported whole, from its full rollout copy
        assert torch.equal(exported[name.removeprefix("policy.")], value), name


def rank_reward(completion: str, sample: dict) -> float:
    """Varied on rank 0, constant on rank 1: DAPO keeps groups on rank 0 and none on rank 1."""
    import torch.distributed as dist

    return 0.5 if dist.is_initialized() and dist.get_rank() == 1 else float(len(completion) % 3)


rank_reward.thread_safe = True  # scored in the rank's own process, where its process group lives


def test_ddp_rank_whose_groups_dapo_all_drops_still_joins_the_step(tmp_path):
    """Rank 1 keeps no group: it trains a zero-weight placeholder so that the gradient all-reduce and
    the step happen on both ranks (no hang, no skip); validation runs on both ranks too."""
    rows, _ = fit(
        tmp_path, "--trainer.strategy=ddp", "--model.algorithm=lit_moe_rl.algorithms.DAPO",
        "--rollout.reward=tests.test_distributed_e2e.rank_reward", "--data.num_val=4", "--data.val_batch_size=2",
        "--trainer.limit_val_batches=null", "--trainer.num_sanity_val_steps=-1", devices=2, batch_size=2, steps=2,
    )  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        assert (
            0.0 < row["rollout/kept_frac"] <= 0.5
        )  # rank 1 kept nothing: the mean over ranks is at most 1/2
        assert row["policy/skipped_steps"] == 0.0 and row["policy/grad_norm"] > 0
