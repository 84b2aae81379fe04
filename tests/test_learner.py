"""The learner runs without Lightning: a plain PyTorch loop trains the quickstart model to the same
weights and metrics, bit for bit, as ``lit-moe-rl fit --config configs/quickstart.yaml``.

The loop uses what the CLI's run uses (the same prompts in the same order, the same rollout callback
and engine, AdamW and its warm-up schedule) and nothing of Lightning: ``loss.backward`` is the
backward, a single-process :class:`~lit_moe_rl.parallel.distributed.Collectives` the collectives.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch

from lit_moe_rl.algorithms import GRPO
from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.cli import main
from lit_moe_rl.learner import Learner, LearnerSettings
from lit_moe_rl.learner.optim import adamw_with_warmup
from lit_moe_rl.parallel.distributed import Collectives
from lit_moe_rl.policy import load_policy, set_training_mode
from lit_moe_rl.rewards.countdown import CountdownReward
from lit_moe_rl.rollout.engine import HFEngine
from tests.helpers import ROOT, latest_metrics, train_rows

STEPS = 3
SEEN: dict[str, list] = {"batches": [], "weights": []}


class Recorder(L.Callback):
    """Records each step's prompts (the data pipeline is not the learner's) and the final weights."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        SEEN["batches"].append((batch["prompt"], batch["samples"]))

    def on_train_end(self, trainer, pl_module) -> None:
        SEEN["weights"].append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})


def cli_run(tmp_path) -> list[dict[str, float]]:
    main([
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.max_steps={STEPS}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks+={__name__}.Recorder",
    ])  # fmt: skip
    return train_rows(latest_metrics(tmp_path))


def plain_loop() -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """configs/quickstart.yaml's run, in a plain loop around the learner."""
    policy, tokenizer = load_policy("builtin:countdown-tiny-moe", None, dtype="float32", seed=0)
    policy.config.use_cache = False
    set_training_mode(policy)
    algorithm = GRPO(clip_low=0.2, clip_high=0.28)
    optimizer, scheduler = adamw_with_warmup(policy.parameters(), lr=5e-5)  # fused where torch has it
    learner = Learner(
        policy,
        algorithm,
        LearnerSettings(micro_batch_size=64),
        optimizer,
        scheduler,
        collectives=Collectives(),
    )
    rollouts = RolloutCallback(
        engine=HFEngine(max_new_tokens=12, temperature=1.0),
        reward=CountdownReward(format="plain"),
        group_size=8,
    )
    rollouts.engine.bind(policy, tokenizer)
    caller = SimpleNamespace(algorithm=algorithm, device=torch.device("cpu"), global_rank=0)
    metrics = []
    for step, (prompts, samples) in enumerate(SEEN["batches"]):
        rollout = rollouts.make_rollout(caller, prompts, samples, step=step)
        metrics.append(learner.step(rollout, optimizer_step=step))
        rollouts.engine.sync_weights(policy)
    rollouts.scorer.close()
    return metrics, policy.state_dict()


def test_a_plain_loop_trains_the_quickstart_exactly_as_the_cli(tmp_path):
    SEEN["batches"].clear()
    SEEN["weights"].clear()
    logged = cli_run(tmp_path)
    assert len(logged) == len(SEEN["batches"]) == STEPS
    metrics, weights = plain_loop()
    (cli_weights,) = SEEN["weights"]
    assert weights.keys() == cli_weights.keys()
    for name, value in cli_weights.items():
        assert torch.equal(weights[name], value), name
    initial = load_policy("builtin:countdown-tiny-moe", None, dtype="float32", seed=0)[0].state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in weights.items())  # it trained
    for row, ours in zip(logged, metrics, strict=True):
        names = {k for k in row if not k.startswith("perf/") and k not in ("epoch", "step")}
        assert names == {k for k in ours if not k.startswith("perf/")}
        for name in names:  # Lightning logs float32 tensors
            assert torch.tensor(ours[name], dtype=torch.float32).item() == row[name], name
