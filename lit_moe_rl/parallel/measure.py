"""Measured memory, to check the planner and the tests' claims against: the bytes of every live tensor
storage of this process (each storage once, DTensors by their local shard), and the process's peak
resident set size."""

from __future__ import annotations

import gc
import resource
import sys
import warnings

import torch


def live_tensor_bytes(device: str | None = None) -> int:
    """Bytes of the distinct storages of all live tensors reachable by the garbage collector (on
    ``device``'s type when given). Freed FSDP2 unsharded storages (resized to 0) count 0."""
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance() on every object trips deprecated module attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        tensor = obj._local_tensor if hasattr(obj, "_local_tensor") else obj
        if tensor.is_meta or (device is not None and tensor.device.type != device):
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or functional wrappers
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start or :func:`reset_peak_rss` (Linux ``VmHWM``;
    ``getrusage`` elsewhere, which also counts a spawned process's pre-``exec`` parent image)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current resident set size (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux ``/proc/self/statm``; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return peak_rss_bytes()
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
