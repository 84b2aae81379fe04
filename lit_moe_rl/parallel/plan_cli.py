"""``lit-moe-rl plan --config X``: print the memory plan of a ``fit`` config, and whether it fits.

The GPU's memory is ``--gpu-memory-gib``, else the detected CUDA device's, else the recipe's
``# plan-hardware: N x G GiB`` header line; overrides as ``--section.key=value`` (YAML values)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lit_moe_rl.parallel.plan import GiB, make_plan
from lit_moe_rl.parallel.plan_config import settings_from_config, stated_hardware
from lit_moe_rl.parallel.plan_shape import config_from_settings, model_shape

USAGE = "lit-moe-rl plan --config FILE [--gpu-memory-gib G] [--host-memory-gib H] [--prompt-tokens N] [--a.b=value ...]"


def _set(config: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        nxt = node.get(key)
        if isinstance(nxt, dict) and "class_path" in nxt and key not in ("strategy",):
            nxt = nxt.setdefault("init_args", {})
        if not isinstance(nxt, dict):
            nxt = node[key] = {}
        node = nxt
    node[keys[-1]] = value


def detected_gpu_bytes() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def plan_file(path: str, overrides: list[str] = (), *, gpu_gib: float | None = None,
              host_gib: float | None = None, prompt_tokens: int | None = None) -> Any:  # fmt: skip
    """The :class:`~lit_moe_rl.parallel.plan.Plan` of config file ``path`` (see this module's docstring)."""
    text = Path(path).read_text()
    config = yaml.safe_load(text) or {}
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"plan: override {item!r} must be --section.key=value")
        _set(config, key, yaml.safe_load(value))
    settings = settings_from_config(config, prompt_tokens=prompt_tokens)
    model = config.get("model") or {}
    hf_config = config_from_settings(model.get("pretrained"), model.get("config"), settings.notes)
    name = Path(model["pretrained"]).name if model.get("pretrained") else None
    shape = model_shape(hf_config, model.get("lora"), name=name)
    hardware = stated_hardware(text)
    capacity = int(gpu_gib * GiB) if gpu_gib else detected_gpu_bytes()
    if capacity is None and hardware:
        capacity = int(hardware[1] * GiB)
        settings.notes.append(
            f"GPU memory from the recipe's plan-hardware line: {hardware[0]} x {hardware[1]:g} GiB"
        )
    host = host_gib if host_gib else hardware[2] if hardware and hardware[2] else None
    return make_plan(shape, settings, capacity, int(host * GiB) if host else None)


def main(argv: list[str]) -> None:
    from lit_moe_rl.parallel.plan import format_plan

    parser = argparse.ArgumentParser(prog="lit-moe-rl plan", usage=USAGE, description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpu-memory-gib", type=float)
    parser.add_argument("--host-memory-gib", type=float)
    parser.add_argument("--prompt-tokens", type=int)
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        raise ValueError(f"plan --config: {args.config} is not a file")
    plan = plan_file(args.config, overrides, gpu_gib=args.gpu_memory_gib, host_gib=args.host_memory_gib,
                     prompt_tokens=args.prompt_tokens)  # fmt: skip
    print(format_plan(plan, args.config))
    if plan.fits is False:
        raise SystemExit(1)
