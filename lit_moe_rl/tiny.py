"""Tiny random MoE configs, one per supported family, for tests and quick experiments.

Each builds in milliseconds on CPU and keeps what makes its family's routing distinct:
Qwen3-MoE renormalises the top-K gate, Qwen2-MoE and OLMoE do not (Qwen2-MoE adds a gated shared
expert), Mixtral always renormalises, DeepSeek-V3 routes with sigmoid scores plus a selection-only
correction bias, expert groups and ``routed_scaling_factor`` (its first layer is dense), GPT-OSS
takes the softmax over the top-K raw logits (with a router bias).
"""

from __future__ import annotations

from typing import Any

import transformers

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss")

_FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            norm_topk_prob=False,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            num_key_value_heads=2,
            rope_scaling=None,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16),
    ),
}


def tiny_moe_config(
    family: str = "qwen3_moe",
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    **overrides: Any,
) -> transformers.PretrainedConfig:
    """A tiny random-init config of ``family`` (one of :data:`FAMILIES`)."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"model family: unknown {family!r}; choose one of {', '.join(FAMILIES)}")
    cls_name, family_kwargs = _FAMILY_CONFIGS[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "deepseek_v3":
        num_hidden_layers = max(num_hidden_layers, 2)  # first layer is dense: keep >= 1 MoE layer
        kwargs["num_hidden_layers"] = num_hidden_layers
    kwargs.update(family_kwargs)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)
