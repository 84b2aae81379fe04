"""A model's :class:`~lit_moe_rl.parallel.plan.ModelShape`: built on the meta device (no memory, exact
parameter counts; LoRA applied through PEFT as the run applies it), from an inline config, a local
folder's ``config.json``, or, when a recipe's folder is absent, the published config of a known model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from lit_moe_rl.parallel.plan import ModelShape

# Published configs (config.json of the Hugging Face repositories), for planning without the weights.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
}  # fmt: skip


def config_from_settings(pretrained: str | None, config: dict | None, notes: list[str]) -> Any:
    """The HF config a run would build: inline ``model.config``, ``model.pretrained``'s config.json, or
    a known model's published config when the folder is not on this machine (noted)."""
    from lit_moe_rl.policy import build_config, resolve_pretrained

    if config is not None:
        return build_config(config)
    if pretrained is None:
        raise ValueError("model: set model.pretrained or model.config to plan")
    try:
        path = resolve_pretrained(pretrained)
    except ValueError:
        name = Path(pretrained).name
        if name not in KNOWN_CONFIGS:
            raise
        notes.append(f"{pretrained} is not on this machine: planned from {name}'s published config.json")
        return transformers.AutoConfig.for_model(**KNOWN_CONFIGS[name])
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def model_shape(config: Any, lora: dict | None = None, name: str | None = None) -> ModelShape:
    """Exact counts of the model ``config`` describes (with ``lora`` applied), built on the meta device."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    base = model
    if lora:
        from lit_moe_rl.lora import apply_lora

        model = apply_lora(model, lora)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = list(base.model.layers)
    units = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    units.append(sum(p.numel() for p in base.get_output_embeddings().parameters()))
    units.append(base.get_input_embeddings().weight.numel())
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    experts = next((getattr(text, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(text, n, None)), 0)  # fmt: skip
    inter = getattr(text, "moe_intermediate_size", None) if experts else None
    return ModelShape(
        name=name or getattr(text, "_name_or_path", None) or text.model_type,
        params=params,
        trained=trained,
        largest_unit=max(units),
        layers=len(layers),
        hidden=text.hidden_size,
        q_dim=heads * head_dim,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size,
        experts=experts,
        top_k=getattr(text, "num_experts_per_tok", 1) if experts else 1,
        expert_inter=inter or getattr(text, "intermediate_size", text.hidden_size * 4),
    )
