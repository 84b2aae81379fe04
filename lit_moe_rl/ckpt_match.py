"""A checkpoint must match the run that resumes it: same model shapes, LoRA, dtype and algorithm.

Lightning would load a checkpoint into whatever the config builds, and LightningCLI would even replace
the configured model by the checkpoint's (``--ckpt_path`` to a file re-parses its hyperparameters). So a
model of another size, a full checkpoint into a LoRA config or a LoRA one into a full config all ran
silently. :func:`check_resume` compares, before any weight is loaded, what the checkpoint was trained
with (:func:`record`, written into every checkpoint) with what this run configured, and refuses a
difference with one line naming both.

Compared: the policy's parameter shapes (whatever ``model.pretrained`` / ``model.config`` built),
``model.dtype``, ``model.lora`` and the algorithm (``model.algorithm``'s class and settings,
``model.correction`` and its arguments). Accepted on purpose (they may change between a run and its
resume, and the config's values are used): ``warmup_steps``, ``grad_clip``, batching and memory (``mini_batches``, ``micro_batch_size``,
``logprob_chunk_size``, ``gradient_checkpointing``, ``trim_padding``, ``shared_prefix``, ``skip_padding``,
``old_logp_pass``), kernels
(``torch_compile``, ``experts_implementation``), and the
*path* of ``model.pretrained`` (a moved folder holds the same model; its shapes are compared).
``lr``, ``weight_decay`` and ``betas`` are restored with the optimiser's state, whatever the config says:
a change is not refused but warned about (:func:`optimizer_notes`), naming the value that stays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from lit_moe_rl.errors import SettingsError

if TYPE_CHECKING:
    from lit_moe_rl.module import MoERLModule

SETTINGS = ("dtype", "lora", "correction", "correction_args")
"""``model.*`` hyperparameters a resume must share with its checkpoint (besides shapes and algorithm)."""


def algorithm_record(algorithm: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of an algorithm object: its plain-valued attributes."""
    cls = type(algorithm)
    args = {
        k: v for k, v in sorted(vars(algorithm).items()) if isinstance(v, int | float | str | bool | None)
    }
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def record(module: MoERLModule) -> dict[str, Any]:
    """What a checkpoint of ``module`` was trained with (stored under ``checkpoint["run_identity"]``)."""
    shapes = {name: list(p.shape) for name, p in module.policy.named_parameters()}
    return {
        "shapes": shapes,
        "algorithm": algorithm_record(module.algorithm),
        **{key: module.hparams.get(key) for key in SETTINGS},
    }


def check_resume(module: MoERLModule, checkpoint: dict[str, Any], path: Any, *, fitting: bool = True) -> None:
    """Raise :class:`SettingsError` when ``checkpoint`` was trained with another model, LoRA or algorithm
    (the algorithm only when ``fitting``: ``validate`` does not use it)."""
    saved = checkpoint.get("run_identity")
    if saved is None:  # written before checkpoints recorded this: compare what Lightning stored
        saved = _legacy_identity(checkpoint)
    now = record(module)
    if not fitting:
        saved = {k: v for k, v in saved.items() if k in ("shapes", "dtype", "lora")}
    where = f"--ckpt_path {path}" if path else "the checkpoint"
    for key in SETTINGS:
        if key in saved and _norm(saved[key]) != _norm(now[key]):
            raise SettingsError(
                f"model.{key}: {where} was trained with {_show(key, saved[key])}, this run sets "
                f"{_show(key, now[key])}: set it as the checkpoint has it, or start a new run without --ckpt_path"
            )
    if "algorithm" in saved and saved["algorithm"] != now["algorithm"]:
        before, after = _algo_diff(saved["algorithm"], now["algorithm"])
        raise SettingsError(
            f"model.algorithm: {where} was trained with {before}, this run sets {after}: "
            "set it as the checkpoint has it, or start a new run without --ckpt_path"
        )
    _check_shapes(saved.get("shapes"), now["shapes"], where, every_name="run_identity" in checkpoint)
    for note in optimizer_notes(module.hparams, checkpoint.get("hyper_parameters") or {}):
        rank_zero_warn(note)


OPTIMIZER_STATE = ("lr", "weight_decay", "betas")
"""Settings the optimiser's checkpointed ``param_groups`` carry over a resume."""


def optimizer_notes(hparams: Any, saved: dict[str, Any]) -> list[str]:
    """One line per optimiser setting that differs from the checkpoint's (the checkpoint's value stays)."""
    notes = []
    for key in OPTIMIZER_STATE:
        old, new = saved.get(key), hparams.get(key)
        if old is not None and new is not None and list(_flat(old)) != list(_flat(new)):
            notes.append(
                f"model.{key}: the checkpoint's optimizer state keeps {key}={old} (its schedule continues); "
                f"this run's {key}={new} is not used: start a new run to change it"
            )
    return notes


def _flat(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else (float(value),)


def _check_shapes(
    saved: dict[str, list[int]] | None, now: dict[str, list[int]], where: str, *, every_name: bool
) -> None:
    """Same shapes for the parameters both have; with ``every_name``, also the same parameter names."""
    if not saved:
        return
    differ = [k for k in saved if k in now and list(saved[k]) != list(now[k])]
    missing = sorted(set(saved) ^ set(now)) if every_name else []
    if differ:
        name = differ[0]
        raise SettingsError(
            f"model: {where} holds another model: {name} is {tuple(saved[name])} there and "
            f"{tuple(now[name])} in the model this run builds (model.pretrained / model.config): "
            "configure the checkpoint's model, or start a new run without --ckpt_path"
        )
    if missing:
        name = missing[0]
        side = "the checkpoint" if name in saved else "this run's model"
        raise SettingsError(
            f"model: {where} holds another model: parameter {name} exists only in {side} "
            f"({len(missing)} differ; model.pretrained / model.config / model.lora): configure the "
            "checkpoint's model, or start a new run without --ckpt_path"
        )


def _legacy_identity(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Settings, and the shapes of the weights it holds (a LoRA one: only the trained ones), from a
    checkpoint written before :func:`record` existed."""
    hparams = checkpoint.get("hyper_parameters") or {}
    weights = checkpoint.get("state_dict") or {}
    shapes = {k.removeprefix("policy."): list(v.shape) for k, v in weights.items() if hasattr(v, "shape")}
    return {"shapes": shapes, **{key: hparams[key] for key in SETTINGS if key in hparams}}


def _norm(value: Any) -> Any:
    return value or None  # {} and None both mean "not set"


def _show(key: str, value: Any) -> str:
    if key == "lora":
        return f"LoRA {dict(value)}" if value else "full fine-tuning (no LoRA)"
    return f"{key}={value!r}"


def _algo_diff(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str, str]:
    """The two algorithms as ``GRPO(clip_high=0.2)``: for one class, only the settings that differ."""

    def show(record: dict[str, Any], keys: list[str]) -> str:
        args = ", ".join(f"{k}={record['init_args'].get(k)}" for k in keys)
        return f"{record['class_path'].rsplit('.', 1)[-1]}({args})"

    keys = sorted(set(saved["init_args"]) | set(now["init_args"]))
    if saved["class_path"] == now["class_path"]:
        keys = [k for k in keys if saved["init_args"].get(k) != now["init_args"].get(k)]
        return show(saved, keys), show(now, keys)
    return show(saved, sorted(saved["init_args"])), show(now, sorted(now["init_args"]))


def saves_adapters_only(hparams: Any) -> bool:
    """LoRA on a model loaded from ``model.pretrained``: the frozen base weights are not saved (the
    checkpoint holds the adapters, a ``full`` router and the optimizer); a resume reloads the base."""
    return bool(hparams["lora"]) and hparams["pretrained"] is not None


def save_module_state(module: MoERLModule, checkpoint: dict[str, Any]) -> None:
    """What an RL checkpoint holds beyond Lightning's: the skip count, the init seed, :func:`record`; and
    only the trained parameters when :func:`saves_adapters_only`."""
    checkpoint["skipped_steps"] = module.learner.skipped_steps if module.learner is not None else 0
    checkpoint["init_seed"] = module.init_seed
    checkpoint["run_identity"] = record(module)  # what a resume must match
    if saves_adapters_only(module.hparams) and "state_dict" in checkpoint:
        trained = {f"policy.{name}" for name, p in module.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}


def load_module_state(module: MoERLModule, checkpoint: dict[str, Any], trainer: Any = None) -> None:
    """Check that ``checkpoint`` matches the run (:func:`check_resume`; ``trainer``: the one restoring it, if
    any), then restore the skip count and seed."""
    fitting = trainer is None or trainer.state.fn == "fit"
    check_resume(module, checkpoint, trainer and trainer.ckpt_path, fitting=fitting)
    module.learner.skipped_steps = checkpoint.get("skipped_steps", 0)
    module.init_seed = checkpoint.get("init_seed", module.init_seed)
