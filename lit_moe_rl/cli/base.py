"""``OneLineCLI``: a LightningCLI whose settings errors are one line (shared by ``fit`` and ``sft``).

The parser is built with ``exit_on_error=False``, so jsonargparse raises instead of printing its usage;
:meth:`OneLineCLI.parse_arguments` rewrites the error as one line (:mod:`lit_moe_rl.errors`), and the
checks of :mod:`lit_moe_rl.cli.checks` run before any class is instantiated.
"""

from __future__ import annotations

import logging
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_moe_rl.checkpoint import recover
from lit_moe_rl.cli import checks as cli_checks
from lit_moe_rl.cli.progress import RunProgressBar
from lit_moe_rl.cli.run_config import VersionedConfig
from lit_moe_rl.cli.threads import apply_num_threads, thread_count
from lit_moe_rl.errors import SettingsError, first_line, parse_error
from lit_moe_rl.parallel.sharding import refuse_fsdp1


class OneLineCLI(LightningCLI):
    """LightningCLI with one-line settings errors and start-up checks; no ``test``/``predict``."""

    def __init__(self, *args: Any, parser_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # no --optimizer/--lr_scheduler: the modules build their own (errors.NOT_SETTINGS says what to set)
        kwargs.setdefault("auto_configure_optimizers", False)
        self.argv: list[str] = []  # the command line, for the resume hint of an interrupted run
        kwargs.setdefault("save_config_callback", VersionedConfig)
        # allow_abbrev: --trainer.max_step is an unknown setting, not a silent --trainer.max_steps
        parser_kwargs = {**(parser_kwargs or {}), "exit_on_error": False, "allow_abbrev": False}
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` only: an RL module has no ``test_step`` or ``predict_step``."""
        subcommands = LightningCLI.subcommands()
        return {name: subcommands[name] for name in ("fit", "validate")}

    def add_default_arguments_to_parser(self, parser: Any) -> None:
        """Lightning's defaults plus ``--num_threads`` (README "Threads")."""
        super().add_default_arguments_to_parser(parser)
        parser.add_argument(
            "--num_threads",
            type=thread_count,  # refused at parse time, --print_config included
            default=0,
            help="torch intra-op CPU threads, >= 0; 0 = auto: OMP_NUM_THREADS if set, else the rule "
            "LIT_MOE_RL_AUTO_THREADS names (default all-cores-short-spin: every core, GOMP_SPINCOUNT=1000; "
            "one-thread-small: 1 on <= 4 cores, else cores // 2; all-cores-passive: every core, "
            "OMP_WAIT_POLICY=PASSIVE).",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, turning a jsonargparse error into a one-line :class:`SettingsError`."""
        argv = list(args) if isinstance(args, list | tuple) else sys.argv[1:] if args is None else []
        self.argv = argv
        cli_checks.check_config_files(argv)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            sub = self._subcommand_parser_for(argv)
            message = parse_error(str(err.message or err), known_keys(sub), subclass_paths(sub))
            raise SettingsError(where_set(message, argv)) from None

    def _subcommand_parser_for(self, argv: list[str]) -> Any:
        parsers = getattr(self, "_subcommand_parsers", {})
        return next((parsers[a] for a in argv if a in parsers), self.parser)

    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint file. Lightning would then replace the configured model by the checkpoint's
        hyperparameters; that happens only when the config names no model (``validate --ckpt_path X``).
        Otherwise the configured model is built and compared with the checkpoint's as it loads
        (:mod:`lit_moe_rl.ckpt_match`)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path:
                recover(Path(str(ckpt_path)))  # a folder swap cut short by a crash (checkpoint.py)
            cli_checks.check_checkpoint(ckpt_path)
            model = self.config[subcommand].get("model") or Namespace()
            if model.get("pretrained") or model.get("config"):
                return
        super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        """Lightning's seeding without its ``Seed set to N`` line, which came before any settings error of
        the model or the data (an error was then two lines); :meth:`_instantiate_trainer` says it."""
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():  # seed_everything: true (no seed in the config) warns instead
                warnings.filterwarnings("ignore", message="No seed found, seed set to")
                super()._set_seed()
        finally:
            seed_log.setLevel(level)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Build the Trainer, the last class built; its own configuration errors get the
        ``trainer.<setting>`` they are about. Then the seed is said, as Lightning says it."""
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise SettingsError(trainer_error(str(err), config)) from None
        seed = self._get(self.config, "seed_everything")
        if seed is not False:
            rank_zero_info(f"Seed set to {seed}")
        return trainer

    def before_instantiate_classes(self) -> None:
        """Checks that need the parsed config but no instantiated class (nor a model download)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or Namespace()
        cli_checks.check_accelerator(trainer.get("accelerator"))
        refuse_fsdp1(trainer.get("strategy"))
        cli_checks.check_wandb(trainer.get("logger"))
        cli_checks.check_logger_dirs(trainer)
        cli_checks.check_trainer_values(trainer)
        apply_num_threads(config.get("num_threads", 0), "num_threads")


def where_set(message: str, argv: list[str]) -> str:
    """``message`` said where its key was set: with ``" (in --config X)"`` when it came from a config file;
    without ``init_args`` when it came from the command line, where a class's argument is usually given
    so (``--model.algorithm.clip_lo``, where the message says ``model.algorithm.init_args.clip_lo``)."""
    key = message.split(":", 1)[0]
    if " " in key:  # not a setting (an unknown subcommand): nothing a file set
        return message
    short = key.replace(".init_args.", ".")
    given = {  # keys on the command line, without init_args; += appends
        arg.split("=", 1)[0].rstrip("+")[2:].replace(".init_args.", ".")
        for arg in argv
        if arg.startswith("--")
    }
    if short in given or any(short.startswith(f"{g}.") for g in given):  # the key, or a whole it is part of
        return short + message[len(key) :]
    files = cli_checks.config_paths_setting(argv, short.split("."))
    return message + (f" (in --config {', '.join(files)})" if files else "")


TRAINER_SETTINGS = ("strategy", "devices", "precision", "accelerator", "num_nodes", "plugins")
TRAINER_SETTINGS += ("enable_checkpointing",)  # "enable_checkpointing=False but found ModelCheckpoint"


def trainer_error(message: str, config: dict[str, Any]) -> str:
    """``trainer.<setting>: <Lightning's message>`` for the first setting the message mentions."""
    text = first_line(message).replace("`", "")
    named = next((name for name in TRAINER_SETTINGS if name in text.lower()), None)
    if named is None:
        return f"trainer: {text}"
    return f"trainer.{named}: {text} (got {config.get(named)!r})"


def known_keys(parser: Any) -> list[str]:
    """Every setting name the parser accepts (``model.lr``, ``trainer.max_steps``, ...)."""
    keys = {a.dest for a in getattr(parser, "_actions", []) if isinstance(a.dest, str)}
    return sorted(k for k in keys if k not in ("help", "config", "print_config"))


def subclass_paths(parser: Any) -> dict[str, list[str]]:
    """For each class-typed setting, the import paths of the classes it accepts (for suggestions)."""
    from jsonargparse._typehints import get_all_subclass_paths

    out: dict[str, list[str]] = {}
    for action in getattr(parser, "_actions", []):
        typehint = getattr(action, "_typehint", None)
        if typehint is None:
            continue
        try:
            paths = get_all_subclass_paths(typehint)
        except Exception:  # not a class type
            continue
        if paths:
            out[action.dest] = paths
    return out


def callbacks_of(config: dict) -> list:
    """``trainer.callbacks`` as a list: a single mapping in YAML gives one callback, not a list."""
    chosen = config.get("callbacks")
    return [] if chosen is None else chosen if isinstance(chosen, list) else [chosen]


def run_progress_bar(config: dict) -> list[ProgressBar]:
    """:class:`~lit_moe_rl.cli.progress.RunProgressBar` unless the user chose a bar or turned it off."""
    chosen = [c for c in callbacks_of(config) if isinstance(c, ProgressBar)]
    return [] if chosen or config.get("enable_progress_bar") is False else [RunProgressBar()]
