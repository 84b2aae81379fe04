"""``lit-moe-rl sft``: the command line of the supervised warm start (:mod:`lit_moe_rl.sft` holds its module)."""

from __future__ import annotations

from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch.loggers import CSVLogger

from lit_moe_rl import sft
from lit_moe_rl.cli.base import OneLineCLI, run_progress_bar


class SFTCLI(OneLineCLI):
    """``lit-moe-rl sft``: the warm-start recipe, with the prompt template shared by data and model."""

    TRAINER_DEFAULTS = {
        "logger": lazy_instance(CSVLogger, save_dir="runs"),
        "enable_checkpointing": False,
        "log_every_n_steps": 10,
        "max_steps": 300,
    }

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.template", "model.template")

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        """``sft`` runs Lightning's ``fit``; its ``--help`` says ``lit-moe-rl sft``, not ``... fit``."""
        super()._add_subcommands(parser, **kwargs)
        fit = self._subcommand_parsers["fit"]
        fit.prog = "lit-moe-rl sft"
        fit.description = (sft.__doc__ or "").split("\n\n", 1)[0].replace("``", "")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Any:
        return super()._instantiate_trainer(config, callbacks + run_progress_bar(config))
