"""``lit-moe-rl``: LightningCLI for RL (``fit``, ``validate``) and supervised warm-start (``sft``).

The rollout callback and the run summary are registered here (top-level ``rollout:`` and
``summary:`` keys) because no RL run works without them; everything else is added by the user
with ``trainer.callbacks``. Settings errors print one line and exit with status 2 (docs/errors.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import Any

from jsonargparse import ArgumentParser, lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.callbacks.summary import RunSummary
from lit_moe_rl.checkpoint import CheckpointError, LastCheckpoint
from lit_moe_rl.cli import algorithm_switch
from lit_moe_rl.cli import checks as cli_checks
from lit_moe_rl.cli.base import OneLineCLI, callbacks_of, run_progress_bar
from lit_moe_rl.cli.compat import unsupported_versions
from lit_moe_rl.cli.interrupt import SigtermStop
from lit_moe_rl.data.datamodule import PromptDataModule
from lit_moe_rl.errors import SettingsError, first_line
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.parallel.distributed import close_process_group
from lit_moe_rl.parallel.rendezvous import RendezvousWatchdog, disarm_all

TRAINER_DEFAULTS = {
    "logger": lazy_instance(CSVLogger, save_dir="runs"),
    "num_sanity_val_steps": -1,
    "log_every_n_steps": 1,
    "max_steps": 100,
}

DEFAULT_CALLBACKS = [
    {
        "class_path": "lit_moe_rl.checkpoint.LastCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": 50, "save_top_k": 0},
    },
]

DESCRIPTION = (
    "RL of Mixture-of-Experts language models with PyTorch Lightning: GRPO and its family (DAPO, Dr. GRPO, "
    "GSPO, GMPO), RSPO, R3 routing replay. Quickstart: lit-moe-rl fit --config configs/quickstart.yaml"
)
SFT_HELP = "Supervised warm start of a small model before RL (lit-moe-rl sft --help)."
PLAN_HELP = "Per-GPU and per-node memory of a config, and whether it fits (lit-moe-rl plan --help)."
REMOVED = {
    "test": "'test' has no meaning for RL training (no test_step): use 'validate' for the held-out reward",
    "predict": "'predict' has no meaning here: use 'validate' to score completions on the held-out prompts",
}


class MoERLCLI(OneLineCLI):
    """LightningCLI with the RL essentials registered."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `sft` is dispatched by main() before parsing; listed here so that `lit-moe-rl --help` shows it
        parser._subcommands_action.add_subcommand("sft", ArgumentParser(description=SFT_HELP), help=SFT_HELP)
        parser._subcommands_action.add_subcommand(
            "plan", ArgumentParser(description=PLAN_HELP), help=PLAN_HELP
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        """The Trainer with the run's own callbacks: :class:`~.progress.RunProgressBar` (unless the user turned
        the bar off or chose one), the last checkpoint, the rendezvous watchdog and the SIGTERM stop."""
        check_duplicate_checkpoints(config)
        for callback in callbacks:
            if isinstance(callback, RunSummary):
                callback.command = ["lit-moe-rl", *self.argv]
        self.watchdog = RendezvousWatchdog(config.get("num_nodes") or 1, config.get("devices"))
        return super()._instantiate_trainer(
            config,
            callbacks + run_progress_bar(config) + last_checkpoint(config) + [self.watchdog, SigtermStop()],
        )

    def before_instantiate_classes(self) -> None:
        """The shared checks, then those of an RL run; the default checkpoint goes when checkpoints are off."""
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        cli_checks.check_run_settings(config)
        drop_default_checkpoint(config.get("trainer"))

    def before_fit(self) -> None:
        self.watchdog.arm()  # nothing waits forever for a process that never starts (parallel/rendezvous.py)

    def before_validate(self) -> None:
        self.watchdog.arm()


def drop_default_checkpoint(trainer: Any) -> None:
    """``trainer.enable_checkpointing: false`` removes the ``trainer.callbacks`` default's checkpoint, which the
    user never added (Lightning would refuse it); a ModelCheckpoint the user added is still refused."""
    if trainer is None or trainer.get("enable_checkpointing") is not False:
        return
    callbacks = trainer.get("callbacks")
    if isinstance(callbacks, list):
        trainer["callbacks"] = [c for c in callbacks if not _is_default_checkpoint(c)]


def _is_default_checkpoint(callback: Any) -> bool:
    default = DEFAULT_CALLBACKS[0]
    if not hasattr(callback, "get") or callback.get("class_path") != default["class_path"]:
        return False
    init_args = callback.get("init_args") or {}
    return all(init_args.get(k) == v for k, v in default["init_args"].items())


def check_duplicate_checkpoints(config: dict) -> None:
    """Two checkpoint callbacks with the same settings (the snippet added to the CLI's default) would
    write the same files; Lightning refuses them with a traceback about ``state_key``."""
    seen: set[str] = set()
    for callback in callbacks_of(config):
        if isinstance(callback, ModelCheckpoint):
            if callback.state_key in seen:
                name = f"{type(callback).__module__}.{type(callback).__qualname__}"
                raise SettingsError(
                    f"trainer.callbacks: {name} is listed twice with the same settings (the CLI registers "
                    "one by default: to change it, paste callbacks/checkpoint.yaml as an item of your config's "
                    "trainer.callbacks list instead of adding it with --trainer.callbacks+=)"
                )
            seen.add(callback.state_key)


def last_checkpoint(config: dict) -> list[LastCheckpoint]:
    """A crash-safe ``last.ckpt`` at the end of every run, unless the config has one or disables checkpoints."""
    chosen = [c for c in callbacks_of(config) if isinstance(c, ModelCheckpoint) and c.save_last]
    return [] if chosen or config.get("enable_checkpointing") is False else [LastCheckpoint()]


# Lightning warnings that describe this trainer's design, not a user's mistake: the policy trains with
# dropout off (eval mode), and manual optimisation checkpoints the weights after the step, as intended.
EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps.*",
    r".*isinstance\(treespec, LeafSpec\).* is deprecated.*",  # Lightning 2.6 internals on torch >= 2.10
    # on resume: the prompt sampler restores its own position from the checkpoint (bitwise, tests/test_resume.py)
    r"You're resuming from a checkpoint that ended before the epoch ended.*",
    # on resume into a new log version: LastCheckpoint keeps no best-k state that could be lost
    r"The dirpath has changed from .*",
)


def _drop_cloud_tip(record: logging.LogRecord) -> bool:
    """Lightning advertises its cloud logger on every run; an offline trainer's log has no use for it."""
    return "litlogger" not in record.getMessage()


_RUN = {"world_size": 1}  # of the run that just ended: main() exits a multi-process one itself


def exit_finished_multiprocess_run() -> None:
    """End a finished multi-process run now, skipping interpreter teardown. Even after
    ``destroy_process_group``, gloo's threads destroyed with the interpreter's statics intermittently
    abort a finished process (exit -6, "terminate called without an active exception"): 2 of 6 runs of
    the 2-process tests. W&B's run and the logs are flushed first."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(args: list[str] | None) -> None:
    algorithm_switch.install()
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_cloud_tip)
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in REMOVED:
        raise ValueError(REMOVED[argv[0]])
    if argv and argv[0] == "plan":  # the memory planner: reads the config, builds nothing
        from lit_moe_rl.parallel.plan_cli import main as plan_main

        plan_main(argv[1:])
        return
    if argv and argv[0] == "sft":
        from lit_moe_rl.cli.sft import SFTCLI
        from lit_moe_rl.sft import SFTModule

        # `sft` is `fit` with the SFT module: the argv rewrite below is ours, not the user's mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")

        SFTCLI(SFTModule, PromptDataModule, args=["fit", *argv[1:]], trainer_defaults=SFTCLI.TRAINER_DEFAULTS)
        return
    try:
        MoERLCLI(
            MoERLModule,
            PromptDataModule,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"prog": "lit-moe-rl", "description": DESCRIPTION},
        )
    except SIGTERMException:  # Lightning's SystemExit(None) would exit 0: a stopped run is not a finished one
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        disarm_all()  # a run that failed before its setup hook
        _RUN["world_size"] = close_process_group()


def main(args: list[str] | None = None) -> None:
    """Console entry point. Settings errors print one line and exit with status 2.

    ``LIT_MOE_RL_DEBUG=1`` shows the full traceback instead.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    problems = unsupported_versions()
    if problems:  # e.g. a GPU image's older transformers: say which package, not a deep AttributeError
        print(f"lit-moe-rl: error: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)
    if os.environ.get("LIT_MOE_RL_DEBUG"):
        _run(args)
    else:
        try:
            _run(args)
        except (ValueError, FileNotFoundError, MisconfigurationException) as err:
            print(f"lit-moe-rl: error: {one_line_of(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        except CheckpointError as err:  # a full disk: not a settings error (exit 1)
            print(f"lit-moe-rl: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
    if _RUN["world_size"] > 1:
        exit_finished_multiprocess_run()


def one_line_of(err: BaseException) -> str:
    """The error's message on one line (jsonargparse's Union blocks unwrapped)."""
    from lit_moe_rl.errors import one_line

    return one_line(str(err)) or first_line(repr(err))
