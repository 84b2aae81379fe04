"""Start-up checks of ``lit-moe-rl`` that fail in one line before any model loads (docs/errors.md).

Each function raises :class:`~lit_moe_rl.errors.SettingsError` naming the file or setting: a config
file that is not valid YAML, a GPU accelerator on a machine without one, an online W&B logger with no
API key, a log folder that cannot be written, a ``--ckpt_path`` that is not a Lightning checkpoint.
Settings that would otherwise run silently wrong or end in a traceback deep in a run are refused too: a
YAML key given twice, ``data.path`` without ``data.source: file``, more ``model.mini_batches`` than a
rollout has sequences, ``val_check_interval: 0``, 64-bit precision, float16 weights on a CPU.
"""

from __future__ import annotations

import netrc
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_moe_rl.errors import SettingsError, describe, first_line

GPU_ACCELERATORS = ("gpu", "cuda")
WANDB_CONNECT_TIMEOUT_S = 5.0
"""How long the start-up check waits for a TCP connection to the W&B server."""


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config``/``-c`` file, and every ``.yaml`` value (``--trainer.callbacks+=x.yaml``), exists
    and parses as YAML; errors give the option, the file, line and column."""
    for option, path in config_paths(argv, with_option=True):
        if not Path(path).is_file():
            raise SettingsError(f"{option}{path}: no such file")
        text = Path(path).read_text()
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or first_line(str(err))
            raise SettingsError(f"{option}{path}: YAML syntax error{where}: {problem}") from None
        check_duplicate_keys(option, path, text)


def config_paths(argv: Sequence[str], with_option: bool = False) -> list[Any]:
    """The ``--config`` files of ``argv`` (with ``with_option``: ``(option, path)`` pairs, also for any
    ``--key=file.yaml`` / ``--key+=file.yaml``)."""
    found: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append(("--config ", argv[i + 1]))
        elif arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            if key == "--config" or (with_option and value.endswith((".yaml", ".yml"))):
                found.append(("--config " if key == "--config" else f"{key}=", value))
    return found if with_option else [path for option, path in found if option == "--config "]


def config_paths_setting(argv: Sequence[str], parts: list[str]) -> list[str]:
    """The ``--config`` files of ``argv`` that set the key ``parts`` (``init_args`` levels optional), or
    all of them when none can be told (unreadable, or the key is not spelled out in any)."""

    def sets(node: Any, parts: list[str]) -> bool:
        if not parts:
            return True
        if not isinstance(node, dict):
            return False
        if parts[0] in node and sets(node[parts[0]], parts[1:]):
            return True
        return isinstance(node.get("init_args"), dict) and sets(node["init_args"], parts)

    files = config_paths(argv)
    found = []
    for file in files:
        try:
            if sets(yaml.safe_load(Path(file).read_text()), parts):
                found.append(file)
        except (OSError, yaml.YAMLError):
            pass
    return found or files


def check_accelerator(accelerator: Any) -> None:
    """``trainer.accelerator: gpu|cuda`` needs CUDA (``auto`` falls back to the CPU by itself)."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else None
    if name in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise SettingsError(
            f"trainer.accelerator: {accelerator!r} but this machine has no CUDA GPU visible to torch "
            "(use --trainer.accelerator=cpu, or auto)"
        )


def check_wandb(logger_cfg: Any) -> None:
    """An online ``WandbLogger`` needs an API key: fail now rather than hang on a login prompt.

    Online means ``offline`` is not set and ``WANDB_MODE`` is not ``offline``/``disabled``/``dryrun``. The
    key comes from ``WANDB_API_KEY`` or a ``~/.netrc`` entry (what ``wandb login`` writes). With a key,
    one TCP connection to the server (``WANDB_BASE_URL``) must open within
    :data:`WANDB_CONNECT_TIMEOUT_S`; nothing is sent.
    """
    for cfg in logger_cfg if isinstance(logger_cfg, list) else [logger_cfg]:
        if "WandbLogger" not in str(_get(cfg, "class_path") or ""):
            continue
        if _get(_get(cfg, "init_args") or {}, "offline") or _wandb_offline_env():
            continue
        if not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise SettingsError(
                "trainer.logger: WandbLogger is online but no W&B API key is set (WANDB_API_KEY or "
                "`wandb login`); set WANDB_MODE=offline to log locally and `wandb sync` later"
            )
        host, port = _wandb_address()
        try:
            socket.create_connection((host, port), timeout=WANDB_CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise SettingsError(
                f"trainer.logger: WandbLogger is online but {host}:{port} cannot be reached "
                f"({err.strerror or describe(err)}); set WANDB_MODE=offline to log locally and `wandb sync` later"
            ) from None


def _wandb_offline_env() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get(
        "WANDB_DISABLED", ""
    ).lower() in ("1", "true")


def _netrc_has_wandb() -> bool:
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_host() -> str:
    return _wandb_address()[0]


def _wandb_address() -> tuple[str, int]:
    """``(host, port)`` of ``WANDB_BASE_URL`` (default ``https://api.wandb.ai``)."""
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    scheme, _, rest = base.rpartition("://")
    host, _, port = rest.split("/", 1)[0].partition(":")
    return host, int(port) if port.isdigit() else (80 if scheme == "http" else 443)


def check_writable(setting: str, folder: Any) -> None:
    """Create ``folder`` (as the logger will) and write a probe file in it; one line when that fails."""
    if folder is None:
        return
    path = Path(str(folder)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or describe(err)
        raise SettingsError(f"{setting}: cannot write to {str(folder)!r} ({reason})") from None


def check_logger_dirs(trainer_cfg: Any) -> None:
    """The log folders (``trainer.logger`` ``save_dir``, ``trainer.default_root_dir``) are writable."""
    loggers = _get(trainer_cfg, "logger")
    for i, cfg in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        save_dir = _get(_get(cfg, "init_args") or {}, "save_dir")
        name = "trainer.logger" + (f"[{i}]" if isinstance(loggers, list) else "")
        if save_dir is not None:
            check_writable(f"{name}.init_args.save_dir", save_dir)
    root = _get(trainer_cfg, "default_root_dir")
    if root is not None:
        check_writable("trainer.default_root_dir", root)


def check_checkpoint(path: Any) -> None:
    """``--ckpt_path`` is a readable Lightning checkpoint (a torch file holding ``state_dict``)."""
    if not path or path in ("last", "best", "hpc", "registry"):
        return
    file = Path(str(path))
    if file.is_dir():  # a sharded checkpoint (ModelParallelStrategy, save_distributed_checkpoint: true)
        if not (file / ".metadata").is_file():
            raise SettingsError(f"--ckpt_path {path}: a folder but not a sharded checkpoint (no .metadata)")
        return
    if not file.is_file():
        raise SettingsError(f"--ckpt_path {path}: no such file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, pickle garbage, a safetensors file, ...
        raise SettingsError(
            f"--ckpt_path {path}: not a readable Lightning checkpoint (truncated or another format: "
            f"{describe(err)})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SettingsError(
            f"--ckpt_path {path}: a torch file but not a Lightning checkpoint (no state_dict)"
        )


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise SettingsError(
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); YAML would keep "
                    "the second silently: delete one"
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def check_duplicate_keys(option: str, path: str, text: str) -> None:
    """A config file with a key twice in one mapping is an error naming the file and both lines."""
    try:
        yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except SettingsError as err:
        raise SettingsError(f"{option}{path}: {err}") from None


def check_run_settings(config: Any) -> None:
    """Cross-setting checks of an RL run (``fit``/``validate``) that would otherwise run silently wrong."""
    check_data_source(config.get("data"))
    check_mini_batches(config)
    check_dtype_device(config)


def check_trainer_values(trainer: Any) -> None:
    """Trainer settings that Lightning or this trainer accept and then fail on deep inside a run."""
    interval = _get(trainer, "val_check_interval")
    if interval is not None and not (isinstance(interval, int | float) and interval > 0):
        raise SettingsError(
            f"trainer.val_check_interval: must be > 0 (an int counts training steps, a float in (0, 1] is a "
            f"fraction of an epoch), got {interval!r}"
        )
    steps = _get(trainer, "max_steps")
    if isinstance(steps, int) and steps < -1:
        raise SettingsError(
            f"trainer.max_steps: must be >= 0 optimizer steps, or -1 for no limit, got {steps}"
        )
    precision = str(_get(trainer, "precision"))
    if precision in ("64", "64-true", "double"):
        raise SettingsError(
            f"trainer.precision: {precision!r} is not supported: transformers' MoE expert kernels take "
            "float32, bfloat16 or float16 (use 32-true, bf16-mixed or bf16-true)"
        )


def check_data_source(data: Any) -> None:
    """``data.path``/``data.val_path`` are read only with ``data.source: file``; Countdown would ignore them."""
    if _get(data, "source") != "countdown":
        return
    for name in ("path", "val_path"):
        if _get(data, name):
            raise SettingsError(
                f"data.{name}: {_get(data, name)!r} is set but data.source is 'countdown', which generates its "
                "prompts and would ignore the file (add --data.source=file)"
            )


def check_mini_batches(config: Any) -> None:
    """``model.mini_batches`` updates need at least as many sequences per rollout on each rank."""
    mini = _get(_get(config, "model"), "mini_batches")
    prompts = _get(_get(config, "data"), "batch_size")
    group = _get(_get(config, "rollout"), "group_size")
    if not all(isinstance(v, int) for v in (mini, prompts, group)):
        return
    for name, value in (("data.batch_size", prompts), ("rollout.group_size", group)):
        if value < 1:
            raise SettingsError(f"{name}: must be >= 1, got {value}")
    if mini > prompts * group:
        raise SettingsError(
            f"model.mini_batches: {mini} updates per rollout, but a rollout has {prompts * group} sequences per "
            f"rank (data.batch_size {prompts} x rollout.group_size {group}): it would run "
            f"{prompts * group} one-sequence updates instead; use at most {prompts * group}"
        )


def check_dtype_device(config: Any) -> None:
    """``float16`` weights on a CPU (``model.dtype``, ``rollout.engine.dtype``): the first rollout's sampling
    probabilities come out NaN there; float16 is a GPU format."""
    engine = _get(_get(_get(config, "rollout"), "engine"), "init_args")
    chosen = [
        ("model.dtype", _get(_get(config, "model"), "dtype")),
        ("rollout.engine.dtype", _get(engine, "dtype")),
    ]
    setting = next((name for name, value in chosen if value == "float16"), None)
    if setting is None:
        return
    accelerator = str(_get(_get(config, "trainer"), "accelerator") or "auto").lower()
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise SettingsError(
            f"{setting}: 'float16' on the CPU makes the rollout's sampling probabilities NaN (float16 is a GPU "
            "format); use float32 or bfloat16"
        )
