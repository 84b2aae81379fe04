"""Every cross-rank reduction of a training step, in one place.

Data parallelism (Lightning's DDP, or FSDP2's data-parallel mesh under ``ModelParallelStrategy``) runs
one rollout slice per rank and *averages* the gradients of the W ranks. The losses of
docs/algorithms.md §2.1 are global means: ``token-mean`` is ``Σ_{ranks, i, t} m L / N_tok`` with ``N_tok``
the token count of the whole mini-batch across ranks, the ``seq-mean-*`` modes divide by the global
sequence count ``N_seq``. The rule that makes the averaged gradient the gradient of the global mean:

    loss_r = W · (Σ_{i,t ∈ rank r} m L) / N_global        (N_global = all-reduced count)
    DDP:   (1/W) Σ_r ∇loss_r = ∇ (Σ_r Σ_{i,t ∈ r} m L) / N_global      — the global mean, exactly.

So every rank normalises by the *all-reduced* count (:func:`global_counts`) and multiplies its
backward loss by :func:`loss_scale` (= W). The logged loss is the unscaled per-rank share, summed
across ranks. Groups never span ranks (the sampler hands each rank whole prompts), so group-relative
advantages and DAPO's group filter stay local; only the counts they feed become global.

A rank never decides alone: the non-finite skip (:func:`all_finite`) and the number of forwards per
pass (:func:`max_over_ranks`) are agreed, because every backward (DDP, FSDP) and every forward (FSDP)
is a collective that all ranks must enter the same number of times.

Logged metrics are reduced by their kind (:mod:`lit_moe_rl.learner.stats`, through :class:`Collectives`);
a metric known only by its name (callbacks' scalars) takes the kind :func:`reduction_of` gives it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Reduction = Literal["sum", "max", "min", "token_mean", "mean"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """W: the number of data-parallel ranks (1 without ``torch.distributed``)."""
    return dist.get_world_size() if is_distributed() else 1


def loss_scale() -> float:
    """The factor each rank's backward loss is multiplied by so that averaged gradients are the
    gradient of the global mean (the rule in this module's docstring)."""
    return float(world_size())


def _all_reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    if not is_distributed():
        return values
    dtype = torch.float64 if device.type != "mps" else torch.float32
    packed = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(packed, op=op)
    return packed.tolist()


def global_counts(
    num_tokens: float, num_seqs: float, norm_const: float, device: torch.device
) -> tuple[float, float, float]:
    """The mini-batch's normalisers over all ranks: ``(Σ tokens, Σ sequences, max norm_const)``."""
    tokens, seqs = _all_reduce([num_tokens, num_seqs], dist.ReduceOp.SUM, device)
    (const,) = _all_reduce([norm_const], dist.ReduceOp.MAX, device)
    return tokens, seqs, const


def global_sum(value: float, device: torch.device) -> float:
    return _all_reduce([value], dist.ReduceOp.SUM, device)[0]


def global_sums(values: list[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over ranks (one collective for all of them)."""
    return _all_reduce(list(values), dist.ReduceOp.SUM, device)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks (e.g. the micro-batch count every rank must run)."""
    return int(_all_reduce([float(value)], dist.ReduceOp.MAX, device)[0])


def all_finite(finite: bool, device: torch.device) -> bool:
    """True only if every rank's ``finite`` is: all ranks skip (or step) together."""
    return _all_reduce([0.0 if finite else 1.0], dist.ReduceOp.MAX, device)[0] == 0.0


class Collectives:
    """The cross-rank operations of a training step, bound to the device its tensors travel on.

    Under an initialised ``torch.distributed`` default group of W > 1 ranks every method is a
    collective that all ranks must call in the same order; otherwise (one process) each is the
    identity. The learner takes one of these, so that a plain loop, Fabric or Lightning can drive it.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    @property
    def world_size(self) -> int:
        return world_size()

    def loss_scale(self) -> float:
        """W: see this module's docstring."""
        return loss_scale()

    def global_counts(
        self, num_tokens: float, num_seqs: float, norm_const: float
    ) -> tuple[float, float, float]:
        return global_counts(num_tokens, num_seqs, norm_const, self.device)

    def sum(self, value: float) -> float:
        return global_sum(value, self.device)

    def max(self, value: int) -> int:
        return max_over_ranks(value, self.device)

    def all_finite(self, finite: bool) -> bool:
        return all_finite(finite, self.device)

    def all_reduce(self, values: list[float], op: Literal["sum", "max", "min"]) -> list[float]:
        """``values`` reduced element-wise over ranks (float64; an empty list costs nothing)."""
        if not values:
            return []
        return _all_reduce(values, _OPS[op], self.device)

    def gather(self, values: Tensor) -> Tensor:
        """Every rank's 1-D ``values`` (lengths may differ), concatenated in rank order, on the CPU."""
        if not is_distributed():
            return values.cpu()
        dtype = torch.float64 if self.device.type != "mps" else torch.float32
        local = values.to(self.device, dtype)
        lengths = [int(n) for n in self.all_reduce_lengths(len(local))]
        padded = torch.zeros(max(lengths), dtype=dtype, device=self.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, lengths, strict=True)]).cpu()

    def all_reduce_lengths(self, length: int) -> list[float]:
        """Each rank's ``length``, in rank order."""
        counts = [0.0] * world_size()
        counts[dist.get_rank()] = float(length)
        return self.all_reduce(counts, "sum")

    def gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
        if not is_distributed():
            return [obj]
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# ------------------------------------------------------------------ metrics
_SUMMED = ("reward/errors", "policy/loss", "policy/kl_loss", "perf/tokens_per_s")
_SAME = ("policy/skipped_steps", "policy/lr", "policy/grad_norm")


def reduction_of(name: str) -> Reduction:
    """How a per-rank scalar known only by its name (callbacks' metrics, the rollout's ``extras``)
    combines across ranks; the learner's own statistics declare their kind where they are produced.

    - ``sum``: counts (``*errors``, ``*_tokens``), throughput, and the loss (each rank's share is already
      normalised by the global count, so the shares add up to the global loss);
    - ``max`` / ``min``: names ending in ``max`` / ``min`` (``ratio_max``, ``response_length_max``);
    - ``token_mean``: per-token averages (``policy/*``, ``mismatch/*``, ``ref/*``, ``rspo/*``,
      ``routing/*``), weighted by each rank's response-token count;
    - ``mean``: everything else: values every rank shares (learning rate, gradient norm, skip count),
      timings, per-rank sizes (``routing/*bytes``), and ``reward/*``, ``rollout/*`` (every rank samples
      the same number of completions, so the plain mean of rank means is the global mean; ``reward/std``
      is computed from the gathered rewards, :class:`lit_moe_rl.learner.stats.Gathered`).
    """
    if name in _SUMMED or name.endswith(("errors", "_tokens")):
        return "sum"
    if name in _SAME or name.startswith("perf/") or name.endswith(("bytes", "_frac")) and "routing/" in name:
        return "mean"
    leaf = name.rsplit("/", 1)[-1]
    if leaf.endswith("max"):
        return "max"
    if leaf.endswith("min"):
        return "min"
    if name.split("/", 1)[0] in ("policy", "mismatch", "ref", "rspo", "routing"):
        return "token_mean"
    return "mean"


def full_tensor(tensor: Tensor) -> Tensor:
    """The full value of a (possibly sharded, FSDP2 ``DTensor``) parameter; a plain tensor as is.

    For a rollout engine that keeps its own full copy of a sharded policy:
    ``target.copy_(full_tensor(param.detach()))``. Under FSDP2 this is a collective: every rank must
    call it for the same parameters in the same order.
    """
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def close_process_group() -> int:
    """Destroy the default process group once a run is over; returns the world size it had (1: none).
    Left to interpreter exit, gloo's worker threads can abort a finished process ("terminate called
    without an active exception", exit -6)."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.destroy_process_group()
        return world
    return 1
