"""FSDP2's full rollout copy follows the policy as Lightning casts and moves it.

``configure_model`` takes the copy before Lightning's precision plugin casts the policy
(``bf16-true``: parameters and buffers to bf16) and moves it to the device. Before, the copy kept fp32
weights and fp32 RoPE ``inv_freq`` while training used bf16 ones, and an engine with its own dtype
copied the copy at ``on_fit_start`` while it was still on the CPU (it was moved at ``on_train_start``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_fit  # noqa: E402

from lit_moe_rl.rollout.engine import HFEngine  # noqa: E402

SEEN: dict[str, object] = {}


class CopyProbe(L.Callback):
    """Records what the engine was bound to, and compares the copy with the policy after training."""

    def setup(self, trainer, pl_module, stage):
        original = HFEngine.bind

        def bind(engine, policy, tokenizer):
            SEEN["bound_dtypes"] = {p.dtype for p in policy.parameters()}
            SEEN["bound_device"] = next(policy.parameters()).device
            SEEN["module_device"] = pl_module.device
            return original(engine, policy, tokenizer)

        self._original = original
        HFEngine.bind = bind

    def teardown(self, trainer, pl_module, stage):
        HFEngine.bind = self._original

    def on_train_end(self, trainer, pl_module):
        copy, policy = pl_module.rollout_policy(), pl_module.policy
        SEEN["policy_dtypes"] = {p.dtype for p in policy.parameters()}
        SEEN["copy_dtypes"] = {p.dtype for p in copy.parameters()}
        mine = dict(copy.named_buffers())
        SEEN["buffers"] = [
            (name, buf.dtype, mine[name].dtype, torch.equal(buf, mine[name]))
            for name, buf in policy.named_buffers()
        ]


def test_the_rollout_copy_has_the_cast_policys_dtypes_and_buffers_before_the_engine_binds(
    tmp_path, restored_environ
):
    SEEN.clear()
    run_fit(
        tmp_path,
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=1",
        "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.precision=bf16-true",
        "--model.dtype=float32",  # Lightning's plugin casts it; the copy was taken before
        "--rollout.engine.dtype=float32",  # an engine with its own copy: it copies what bind() gets
        "--data.num_val=0",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.callbacks+={__name__}.CopyProbe",
    )
    assert SEEN["policy_dtypes"] == {torch.bfloat16}
    assert SEEN["bound_dtypes"] == {torch.bfloat16} and SEEN["bound_device"] == SEEN["module_device"]
    assert SEEN["copy_dtypes"] == {torch.bfloat16}
    assert SEEN["buffers"] and all(ours == theirs and same for _, ours, theirs, same in SEEN["buffers"]), (
        SEEN["buffers"]
    )
