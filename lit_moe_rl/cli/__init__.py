"""The command line: ``lit-moe-rl fit | validate | sft``.

- :mod:`.app`: the LightningCLI for RL (forced rollout callback and run summary, one-line errors, ``main``);
- :mod:`.sft`: the ``sft`` subcommand's CLI (the warm-start module is :mod:`lit_moe_rl.sft`);
- :mod:`.base`: what both CLIs share (parse errors in one line, trainer checks, threads, progress bar);
- :mod:`.progress`: the progress bar, in rollouts to ``max_steps`` with the training reward;
- :mod:`.checks`: start-up checks of a whole config, before any model loads (docs/errors.md);
- :mod:`.algorithm_switch`: ``--model.algorithm=<Class>`` resets to the new class's defaults;
- :mod:`.threads`, :mod:`.compat`: CPU thread count and OpenMP wait policy (set on import, before torch
  loads); package versions refused at start-up;
- :mod:`.interrupt`: SIGTERM stops every rank after the same step; :mod:`.run_config`: the saved config, versioned.

The errors' one-line vocabulary (:mod:`lit_moe_rl.errors`) is shared with the library's own checks.
"""

from lit_moe_rl.cli.threads import prepare_openmp_env

prepare_openmp_env()  # before anything imports torch: OpenMP reads its wait policy once, when torch loads

from lit_moe_rl.cli.app import MoERLCLI, main  # noqa: E402

__all__ = ["MoERLCLI", "main"]
