"""The CLI's torch CPU thread count (``--num_threads``).

torch's default (one intra-op thread per core) is a poor fit for the small models this trainer runs
on CPU: their matrices are too small to split, and on a shared machine OpenMP's spin-waiting threads
compete with each other and with other processes (the quickstart measured several times slower with
the default than with one thread; README "Threads"). The automatic choice is one thread on machines
with at most 4 cores and half the cores above that; ``OMP_NUM_THREADS``, when set, wins over auto.
"""

from __future__ import annotations

import os

import torch

from lit_moe_rl.errors import SettingsError


def auto_num_threads(cores: int | None = None) -> int:
    """Threads when ``--num_threads 0``: ``OMP_NUM_THREADS`` if set, else 1 on <= 4 cores, else cores // 2."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return 1 if cores <= 4 else cores // 2


def apply_num_threads(num_threads: int, setting: str = "num_threads") -> int:
    """Set torch's intra-op threads (``num_threads`` >= 0; 0 = :func:`auto_num_threads`); returns the count."""
    if not isinstance(num_threads, int) or num_threads < 0:
        raise SettingsError(f"{setting}: must be an integer >= 0 (0 = auto), got {num_threads!r}")
    count = num_threads or auto_num_threads()
    torch.set_num_threads(count)
    return count
