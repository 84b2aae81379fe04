"""SIGTERM stops every rank after the same step: a flag, agreed across ranks at each step's end.

Lightning's own SIGTERM handler forwards the signal to the processes it launched and, inside the signal
handler, broadcasts a flag from rank 0: a collective that can meet another one mid-step, and each rank
then stops at its own point (a 2-process run died with "Connection reset by peer"). :class:`SigtermStop`
replaces it while training: the handler only sets a flag; at the end of every training step all ranks
agree on it (one all-reduce of one number) and set Lightning's own flag together, so every rank ends the
same finished step, logs it, and raises Lightning's ``SIGTERMException``; then the run summary saves
``last.ckpt``, prints the summary and the resume command (:mod:`lit_moe_rl.callbacks.summary`) and the CLI
exits 143. A SIGTERM to rank 0 alone (``kill PID`` of the launching process) stops them all.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_moe_rl.parallel.distributed import max_over_ranks

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


class SigtermStop(Callback):
    """Ends the run at the end of the step during which any rank received SIGTERM."""

    def __init__(self) -> None:
        self.received = False

    def _install(self) -> None:
        """Replace Lightning's handler (installed just before training; restored by its teardown)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.received:
            rank_zero_info("SIGTERM received: stopping after the current step (it is saved as last.ckpt)")
        self.received = True

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if max_over_ranks(int(self.received), pl_module.device) > 0:
            trainer._signal_connector.received_sigterm = True  # Lightning stops after logging this step
