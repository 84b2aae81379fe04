"""AdamW's state off the device while the rollout generates (``model.offload_optimizer: true``).

Generation needs the full weights and the KV cache; the optimizer state (two fp32 moments per trained
parameter: 8 bytes each, 2x the fp32 master weights) is idle then. :func:`offloaded` copies every state
tensor to host memory (pinned when it lives on CUDA, so the copies back are asynchronous DMA), frees
its device storage in place (``untyped_storage().resize_(0)``: the tensor objects, and the DTensors and
optimizer that hold them, stay the same), and on exit restores the bytes exactly: the state after a
round trip is bitwise what it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's per-parameter state tensors with storage (local shards of DTensors), skipping
    scalars such as AdamW's ``step`` on the CPU."""
    out = []
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.dim() > 0 and local.untyped_storage().nbytes() > 0:
                out.append(local)
    return out


def offload(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy each tensor to host memory and free its storage; returns the host copies."""
    hosts = []
    for tensor in tensors:
        pin = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        host.copy_(tensor, non_blocking=pin)
        hosts.append(host)
    if any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()
    for tensor in tensors:
        tensor.untyped_storage().resize_(0)
    return hosts


def restore(tensors: list[torch.Tensor], hosts: list[torch.Tensor], nbytes: list[int]) -> None:
    """Reallocate each tensor's storage (``nbytes``) and copy its host bytes back."""
    for tensor, host, size in zip(tensors, hosts, nbytes, strict=True):
        tensor.untyped_storage().resize_(size)
        tensor.copy_(host, non_blocking=host.is_pinned())
    if any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()


@contextlib.contextmanager
def offloaded(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Inside the block, ``optimizer``'s state lives in host memory only (a no-op for None)."""
    tensors = state_tensors(optimizer) if optimizer is not None else []
    nbytes = [t.untyped_storage().nbytes() for t in tensors]
    hosts = offload(tensors)
    try:
        yield
    finally:
        restore(tensors, hosts, nbytes)
