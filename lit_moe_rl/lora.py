"""LoRA through PEFT: the ``model.lora`` settings, applied in ``configure_model``.

``target_modules`` names ``nn.Linear`` modules (attention projections; PEFT silently ignores a name
that is not a Linear, such as transformers 5's fused expert tensors ``gate_up_proj``). The experts are
adapted with ``target_parameters`` (PEFT's parameter LoRA): ``["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]``. The router is a setting of its own:

- ``frozen`` (default): neither adapted nor trained; routing moves only through the hidden states;
- ``full``: trained in full (PEFT ``modules_to_save``: a trained copy beside the frozen original, so the
  reference model, the adapter disabled, still routes with the initial router);
- ``adapted``: a LoRA on the router weight (``target_parameters``).

Routing replay and RSPO's capture find the routers under PEFT's wrappers
(:func:`lit_moe_rl.routing.adapters.find_moe_routers`); the reference model is the base model with the
adapter disabled; :meth:`lit_moe_rl.module.MoERLModule.save_hf` merges the adapters.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

RouterMode = Literal["frozen", "full", "adapted"]
KEYS = ("rank", "alpha", "dropout", "target_modules", "target_parameters", "router")


def check_lora_settings(settings: dict[str, Any], setting: str = "model.lora") -> None:
    """The ``model.lora`` keys and ranges, checked before the model loads (one line naming the setting):
    ``rank`` an integer >= 1, ``alpha`` > 0, ``dropout`` in [0, 1), ``router`` frozen | full | adapted."""
    from lit_moe_rl.errors import SettingsError

    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise SettingsError(f"{setting}: unknown setting {unknown[0]!r}; expected some of {', '.join(KEYS)}")
    rank, alpha = settings.get("rank", 8), settings.get("alpha", 16)
    dropout, router = settings.get("dropout", 0.0), settings.get("router", "frozen")
    if not isinstance(rank, int) or rank < 1:
        raise SettingsError(f"{setting}.rank: must be an integer >= 1, got {rank!r}")
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise SettingsError(f"{setting}.alpha: must be > 0, got {alpha!r}")
    if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
        raise SettingsError(f"{setting}.dropout: must be in [0, 1), got {dropout!r}")
    if router not in ("frozen", "full", "adapted"):
        raise SettingsError(f"{setting}.router: must be frozen, full or adapted, got {router!r}")


def lora_config(settings: dict[str, Any], policy: nn.Module) -> Any:
    """``peft.LoraConfig`` from ``model.lora`` (see :func:`check_lora_settings`)."""
    from peft import LoraConfig

    check_lora_settings(settings)
    rank, alpha = settings.get("rank", 8), settings.get("alpha", 16)
    dropout, router = settings.get("dropout", 0.0), settings.get("router", "frozen")
    targets = settings.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    params = list(settings.get("target_parameters") or [])
    router_names = _router_names(policy)
    if router == "adapted":
        params += [f"{name}.weight" for name in router_names]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=params or None,
        exclude_modules=router_names if router != "adapted" and targets == "all-linear" else None,
        modules_to_save=router_names if router == "full" else None,
    )


def apply_lora(policy: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``policy`` wrapped by PEFT: only the adapters (and a ``full`` router) require grad.

    PEFT's own refusals (a target that names no module or parameter of this model) become one line
    naming ``model.lora``.
    """
    from peft import get_peft_model

    from lit_moe_rl.errors import SettingsError, first_line

    config = lora_config(settings, policy)
    try:
        return get_peft_model(policy, config)
    except (ValueError, TypeError, KeyError) as err:
        raise SettingsError(
            f"model.lora: PEFT cannot apply it to this model: {first_line(str(err))}"
        ) from None


def _router_names(policy: nn.Module) -> list[str]:
    from lit_moe_rl.routing.adapters import find_moe_routers

    return [router.name for router in find_moe_routers(policy)]
