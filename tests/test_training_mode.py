"""The policy has one mode, set once: training mode with every dropout zeroed.

Before, the mode depended on the path: the separate π_old pass forced ``train()``, the fused path never
set one, and a model loaded from disk starts in eval mode. So ``gradient_checkpointing: true`` did
nothing in the default one-mini-batch setup (HF recomputes only in training mode), and with a
separate π_old pass LoRA dropout ran in the updates (ratio != 1 at the first, on-policy update).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_fit, train_rows  # noqa: E402

SEEN: list[tuple] = []  # (grad enabled, training) of every training-step forward, ("dropout", max p)


class ModeProbe(L.Callback):
    """Records, around each training step, the mode of every policy forward and the dropout in use."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lit_moe_rl.parallel.sharding import decoder_layers

        self._hook = decoder_layers(pl_module.policy)[0].register_forward_pre_hook(
            lambda module, args: (
                None  # generation (inference mode) is the engine's own business
                if torch.is_inference_mode_enabled()
                else SEEN.append((torch.is_grad_enabled(), module.training))
            )
        )
        SEEN.append(
            (
                "dropout",
                max(
                    (m.p for m in pl_module.policy.modules() if isinstance(m, torch.nn.Dropout)), default=0.0
                ),
            )
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._hook.remove()


BUILTIN = ["--model.pretrained=builtin:countdown-tiny-moe", "--model.config=null", "--data.num_val=0",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
           f"--trainer.callbacks+={__name__}.ModeProbe"]  # fmt: skip


def test_gradient_checkpointing_runs_on_the_fused_path_of_a_model_loaded_from_disk(tmp_path):
    """... and is turned on without transformers' deprecation warning for its old name."""
    import warnings

    SEEN.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_fit(tmp_path, *BUILTIN, "--model.gradient_checkpointing=true")
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    forwards = [training for grad, training in SEEN if grad is True]
    assert forwards and all(forwards), SEEN  # training mode: HF's checkpointing recomputes


@pytest.mark.parametrize("algorithm", ["RSPO", "GRPO"])
def test_lora_dropout_does_not_run_in_rl_updates(tmp_path, algorithm):
    """RSPO has a separate π_old pass; the first update is on-policy, so its ratio is exactly 1."""
    SEEN.clear()
    lora = '--model.lora={"rank": 4, "alpha": 8, "dropout": 0.3}'
    rows = train_rows(
        run_fit(tmp_path, *BUILTIN, lora, f"--model.algorithm=lit_moe_rl.algorithms.{algorithm}")
    )
    assert all(p == 0.0 for kind, p in SEEN if kind == "dropout")
    passes = [training for grad, training in SEEN if grad is True or grad is False]
    assert len(passes) >= 2 and all(passes)  # the π_old pass (RSPO) and the update, both in training mode
    for row in rows:  # one mini-batch: every update is the first after its π_old pass
        assert row["policy/ppo_kl"] == pytest.approx(0.0, abs=1e-7)
        assert row["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
