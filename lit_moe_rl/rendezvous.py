"""Nothing waits forever for a process that will never come: a time limit on the rendezvous.

``torch.distributed.init_process_group`` waits (30 minutes by default, deaf to Ctrl-C, which Python only
handles between bytecodes) until every process of the run has joined. ``--trainer.num_nodes=2`` typed
on one machine waits for a second node no one started. :class:`RendezvousWatchdog` is armed just before
the trainer starts (``before_fit`` / ``before_validate``) and disarmed when the process group exists or
the trainer's ``setup`` hook runs; if neither happens within ``LIT_MOE_RL_RENDEZVOUS_TIMEOUT`` seconds
(default 300) it prints one line naming the launchers a multi-node run needs and ends the process
(exit 2). The collectives of the run itself keep their own (strategy) timeout.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

ENV = "LIT_MOE_RL_RENDEZVOUS_TIMEOUT"
DEFAULT_S = 300.0


def timeout_s() -> float:
    """The rendezvous time limit in seconds (``LIT_MOE_RL_RENDEZVOUS_TIMEOUT``, > 0)."""
    raw = os.environ.get(ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        from lit_moe_rl.errors import SettingsError

        raise SettingsError(f"{ENV}: must be a number of seconds > 0, got {raw!r}")
    return value


def message(num_nodes: int, devices: Any, seconds: float) -> str:
    """The one line printed when the processes of a run did not all join in time."""
    addr = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
    per_node = str(devices) if str(devices).isdigit() and int(devices) > 0 else "<processes per node>"
    return (
        f"trainer.num_nodes={num_nodes}: not every process of the run joined within {seconds:.0f} s "
        f"(rendezvous at {addr}). A run over several machines must be started on each of them by a launcher: "
        f"torchrun --nnodes={num_nodes} --nproc-per-node={per_node} --node-rank=<this node's index> "
        f"--master-addr=<node 0's address> --master-port=<free port> -m lit_moe_rl.cli fit ..., or under SLURM "
        f"srun lit-moe-rl fit ... in a job with --nodes={num_nodes} --ntasks-per-node={per_node} "
        f"(on one machine: trainer.num_nodes=1); {ENV}=<seconds> waits longer"
    )


class RendezvousWatchdog(Callback):
    """Ends the process with one line if the process group is not up ``timeout_s`` after :meth:`arm`."""

    def __init__(self, num_nodes: int = 1, devices: Any = None, seconds: float | None = None) -> None:
        self.num_nodes, self.devices = num_nodes, devices
        self.seconds = timeout_s() if seconds is None else seconds
        self._done = threading.Event()

    def arm(self) -> None:
        self._done.clear()
        threading.Thread(target=self._watch, name="rendezvous-watchdog", daemon=True).start()

    def disarm(self) -> None:
        self._done.set()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.disarm()  # the strategy's environment (and process group) is set up by now

    def _watch(self) -> None:
        waited = 0.0
        while not self._done.wait(0.5):
            waited += 0.5
            if dist.is_available() and dist.is_initialized():
                return
            if waited >= self.seconds:
                print(
                    f"lit-moe-rl: error: {message(self.num_nodes, self.devices, self.seconds)}",
                    file=sys.stderr,
                )
                sys.stderr.flush()
                os._exit(2)
