"""The engine's own low-precision copy has the dtypes (and values) of Hugging Face's own load."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout.engine import HFEngine


def _tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize(
    ("family", "dtype"), [("qwen3_moe", "bfloat16"), ("deepseek_v3", "bfloat16"), ("gpt_oss", "float16")]
)
def test_engine_copy_has_the_dtypes_and_values_of_from_pretrained(tmp_path, family, dtype):
    policy, tok = load_policy(config={"family": family})
    policy.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, dtype))
    engine = HFEngine(dtype=dtype)
    engine.bind(policy, tok)
    ours, ref = _tensors(engine.model), _tensors(reference)
    assert ours.keys() == ref.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == ref[name].dtype, name
        assert torch.equal(tensor, ref[name]), name  # inv_freq: HF's fp32 values, not rounded ones
    kept_fp32 = {name for name, t in ours.items() if t.dtype == torch.float32}
    assert "model.rotary_emb.inv_freq" in kept_fp32
    if family == "deepseek_v3":  # _keep_in_fp32_modules_strict: the router's bias, and in newer
        strict = type(policy)._keep_in_fp32_modules_strict  # transformers its weight: the class decides
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in kept_fp32
        assert ("model.layers.1.mlp.gate.weight" in kept_fp32) == ("gate.weight" in strict)
    if family == "gpt_oss":  # _keep_in_fp32_modules applies to fp16 loads: the norms
        assert "model.norm.weight" in kept_fp32
    assert not any(t.requires_grad for t in engine.model.parameters())

    with torch.no_grad():  # an optimizer step, and DeepSeek's bias update (a buffer)
        for name, tensor in _tensors(policy).items():
            if tensor.is_floating_point() and not name.endswith("inv_freq"):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    engine.sync_weights(policy)
    policy.save_pretrained(tmp_path / "after")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "after", dtype=getattr(torch, dtype)
    )
    ref = _tensors(reference)
    for name, tensor in _tensors(engine.model).items():
        assert tensor.dtype == ref[name].dtype, name
        if name.endswith("inv_freq"):
            continue  # not a weight: HF recomputes it, the engine keeps the one it copied
        assert torch.equal(tensor, ref[name]), name


def test_bf16_rope_keeps_the_fp32_angles_at_long_positions():
    """``.to(bfloat16)`` rounds inv_freq; the engine copy keeps it, so its RoPE angles equal the trainer's."""
    policy, tok = load_policy(config={"family": "qwen3_moe", "max_position_embeddings": 8192})
    engine = HFEngine(dtype="bfloat16")
    engine.bind(policy, tok)
    inv_freq = policy.model.rotary_emb.inv_freq
    position = torch.tensor(4096.0)
    naive = (position * inv_freq.to(torch.bfloat16).float() - position * inv_freq).abs().max()
    ours = (position * engine.model.model.rotary_emb.inv_freq - position * inv_freq).abs().max()
    assert naive > 0.1 and ours == 0  # the naive cast's angle error is 0.1-1 rad here
