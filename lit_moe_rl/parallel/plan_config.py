"""Plan settings from a ``lit-moe-rl fit`` config file (``lit-moe-rl plan``) or from a live run (``fit``'s
check at start), so that both read the same settings the same way."""

from __future__ import annotations

import re
from typing import Any

from lit_moe_rl.parallel.plan import PlanSettings

DEFAULT_PROMPT_TOKENS = 512
HARDWARE = re.compile(r"#\s*plan-hardware:\s*(\d+)\s*x\s*([\d.]+)\s*GiB(?:.*?([\d.]+)\s*GiB host)?", re.I)


def _init_args(value: Any) -> dict:
    if isinstance(value, dict):
        return dict(value.get("init_args") or {})
    return {}


def _class_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("class_path", ""))
    return str(value or "")


def dtypes(precision: str, model_dtype: str, compute_dtype: str | None) -> tuple[str, str]:
    """(trained weights' dtype, compute dtype) for Lightning's ``precision`` and the module's settings."""
    precision = str(precision)
    if compute_dtype:
        return "float32", compute_dtype
    if precision.startswith("bf16-true"):
        return "bfloat16", "bfloat16"
    if precision.startswith("16-true"):
        return "float16", "float16"
    if precision.startswith("bf16"):
        return model_dtype, "bfloat16"
    if precision.startswith("16"):
        return model_dtype, "float16"
    return model_dtype, model_dtype


def settings_from_config(config: dict, *, prompt_tokens: int | None = None) -> PlanSettings:
    """:class:`PlanSettings` of a parsed ``fit`` config (plain dicts, as in the YAML file)."""
    trainer, model = config.get("trainer") or {}, config.get("model") or {}
    data, rollout = config.get("data") or {}, config.get("rollout") or {}
    devices = trainer.get("devices", 1)
    per_node = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else 1
    ranks = per_node * int(trainer.get("num_nodes", 1) or 1)
    strategy = trainer.get("strategy")
    sharded = "ModelParallelStrategy" in _class_name(strategy)
    weight, compute = dtypes(trainer.get("precision", "32-true"), model.get("dtype", "float32"),
                             model.get("compute_dtype"))  # fmt: skip
    engine = _init_args(rollout.get("engine"))
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    notes: list[str] = []
    prompt = engine.get("max_prompt_len") or prompt_tokens
    if prompt is None:
        prompt = DEFAULT_PROMPT_TOKENS
        notes.append(
            f"prompts planned at {prompt} tokens (set rollout.engine.max_prompt_len, or plan --prompt-tokens)"
        )
    budget = rollout.get("max_batch_tokens") or engine.get("max_batch_tokens")
    if budget is None:
        notes.append(
            "no rollout.max_batch_tokens: the KV cache holds batch_size x group_size x (prompt + max_new_tokens)"
        )
    engine_dtype = engine.get("dtype", "same")
    algorithm = _init_args(model.get("algorithm"))
    return PlanSettings(
        ranks=ranks,
        ranks_per_node=per_node,
        sharded=sharded,
        weight_dtype=weight,
        compute_dtype=compute,
        load_dtype=model.get("dtype", "float32"),
        rollout_weights=model.get("rollout_weights", "resident"),
        engine_dtype=None if engine_dtype == "same" else engine_dtype,
        offload_optimizer=bool(model.get("offload_optimizer", False)),
        rank0_load=sharded
        and model.get("rollout_weights") == "unshard"
        and model.get("pretrained") is not None,
        reference=float(algorithm.get("kl_coef", 0.0) or 0.0) > 0,
        micro_batch_size=int(model.get("micro_batch_size", 16)),
        prompt_tokens=int(prompt),
        max_new_tokens=int(engine.get("max_new_tokens", 64)),
        prompts_per_rank=int(data.get("batch_size", 2)),
        group_size=int(rollout.get("group_size", 8)),
        max_batch_tokens=budget,
        gradient_checkpointing=bool(model.get("gradient_checkpointing", False)),
        logprob_chunk_tokens=model.get("logprob_chunk_size"),
        record_routes=any("RoutingReplayCallback" in _class_name(c) for c in callbacks),
        notes=notes,
    )


def stated_hardware(text: str) -> tuple[int, float, float | None] | None:
    """``(GPUs, GiB per GPU, host GiB per node or None)`` from a recipe's ``# plan-hardware:`` line."""
    match = HARDWARE.search(text)
    if not match:
        return None
    return int(match.group(1)), float(match.group(2)), float(match.group(3)) if match.group(3) else None
