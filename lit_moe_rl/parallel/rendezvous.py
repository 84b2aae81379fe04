"""Nothing waits forever for a process that will never come: a time limit on the rendezvous.

``torch.distributed.init_process_group`` waits (30 minutes by default, deaf to Ctrl-C, which Python only
handles between bytecodes) until every process of the run has joined. ``--trainer.num_nodes=2`` typed
on one machine waits for a second node no one started. :class:`RendezvousWatchdog` is armed just before
the trainer starts (``before_fit`` / ``before_validate``) and disarmed when the process group exists or
the trainer's ``setup`` hook runs; if neither happens within ``LIT_MOE_RL_RENDEZVOUS_TIMEOUT`` seconds
(default 300) it prints one line naming the launchers a multi-node run needs and ends the process
(exit 2); Ctrl-C during the wait ends it at once (exit 130). The collectives of the run itself keep
their own (strategy) timeout.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

ENV = "LIT_MOE_RL_RENDEZVOUS_TIMEOUT"
DEFAULT_S = 300.0

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


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
    per_node = str(devices) if str(devices).isdigit() and int(devices) > 0 else "<processes per node>"
    return (
        f"trainer.num_nodes={num_nodes}: not every process of the run joined within {seconds:.0f} s "
        f"({_where()}). A run over several machines must be started on each of them by a launcher: "
        f"torchrun --nnodes={num_nodes} --nproc-per-node={per_node} --node-rank=<this node's index> "
        f"--master-addr=<node 0's address> --master-port=<free port> -m lit_moe_rl.cli fit ..., or under SLURM "
        f"srun lit-moe-rl fit ... in a job with --nodes={num_nodes} --ntasks-per-node={per_node} "
        f"(on one machine: trainer.num_nodes=1); {ENV}=<seconds> waits longer"
    )


_ARMED: set[RendezvousWatchdog] = set()


def disarm_all() -> None:
    """Disarm every armed watchdog: a run that ended (or failed) before its ``setup`` hook must not be
    ended by its watchdog later (an in-process caller would be)."""
    for watchdog in list(_ARMED):
        watchdog.disarm()


class RendezvousWatchdog(Callback):
    """Ends the process with one line if the process group is not up ``timeout_s`` after :meth:`arm`."""

    def __init__(self, num_nodes: int = 1, devices: Any = None, seconds: float | None = None) -> None:
        self.num_nodes, self.devices = num_nodes, devices
        self.seconds = timeout_s() if seconds is None else seconds
        self._done = threading.Event()
        self._old_wakeup: int | None = None
        self._write_fd: int | None = None

    def arm(self) -> None:
        """Start watching. Ctrl-C is heard too: Python runs its handler only between bytecodes, never while
        the main thread waits inside the rendezvous, but it writes the signal to a wake-up pipe at once."""
        self._done.clear()
        _ARMED.add(self)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        if threading.current_thread() is threading.main_thread():
            self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="rendezvous-watchdog", daemon=True).start()

    def disarm(self) -> None:
        """Stop watching; the signal wake-up goes back to what it was before its pipe is closed."""
        _ARMED.discard(self)
        if self._old_wakeup is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        self._done.set()
        if self._write_fd is not None and self._old_wakeup is None:
            os.close(self._write_fd)
            self._write_fd = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.disarm()  # the strategy's environment (and process group) is set up by now

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.disarm()

    def _watch(self, read_fd: int) -> None:
        deadline = time.monotonic() + self.seconds
        try:
            while not self._done.is_set():
                if dist.is_available() and dist.is_initialized():
                    return
                if select.select([read_fd], [], [], 0.5)[0] and signal.SIGINT in os.read(read_fd, 64):
                    _exit(
                        130,
                        f"interrupted (Ctrl-C) while waiting for the other processes of the run: {_where()}",
                    )
                if time.monotonic() >= deadline:
                    _exit(2, f"error: {message(self.num_nodes, self.devices, self.seconds)}")
        finally:
            os.close(read_fd)


def _where() -> str:
    return f"rendezvous at {os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"


def _exit(status: int, line: str) -> None:
    """Print ``line`` and end the process now (the main thread is stuck inside the rendezvous)."""
    print(f"lit-moe-rl: {line}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(status)
