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

Logged metrics go through torchmetrics (:class:`RankMetrics`), which all-gathers their states when
run under ``torch.distributed``. Each name declares its reduction by :func:`reduction_of`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, Metric, MinMetric, SumMetric

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


# ------------------------------------------------------------------ metrics
_SUMMED = ("reward/errors", "policy/loss", "policy/kl_loss", "perf/tokens_per_s")
_SAME = ("policy/skipped_steps", "policy/lr", "policy/grad_norm")


def reduction_of(name: str) -> Reduction:
    """How metric ``name`` combines across ranks.

    - ``sum``: counts (``*errors``, ``*_tokens``), throughput, and the loss (each rank's share is already normalised by the
      global count, so the shares add up to the global loss);
    - ``max`` / ``min``: names ending in ``max`` / ``min`` (``ratio_max``, ``response_length_max``);
    - ``token_mean``: per-token averages (``policy/*``, ``mismatch/*``, ``ref/*``, ``rspo/*``,
      ``routing/*``), weighted
      by each rank's response-token count: exact for token means, a token-weighted average of the
      per-rank values for quantiles (``rspo/gamma_p10``) and sequence-level fractions;
    - ``mean``: everything else: values every rank shares (learning rate, gradient norm, skip count),
      timings, per-rank sizes (``routing/*bytes``), and ``reward/*``, ``rollout/*`` (every rank samples the same number of completions, so
      the plain mean of rank means is the global mean; ``reward/std`` is the mean of per-rank stds).
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


_METRIC = {"sum": SumMetric, "max": MaxMetric, "min": MinMetric}


class RankMetrics:
    """One torchmetrics object per logged name; :meth:`reduce` returns each step's values, synced.

    Metrics are built with ``dist_sync_on_step=True``: their ``forward`` returns the batch value
    gathered over all ranks; a single process logs its values as they are. Every rank must reduce the
    same names in the same order; :meth:`reduce` first agrees on the union of names, so a metric one
    rank lacks (weight 0 there) cannot desynchronise the collectives.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _metric(self, name: str, device: torch.device) -> Metric:
        if name not in self.metrics:
            kind = reduction_of(name)
            # NaN stays visible (a NaN loss is logged as NaN). MeanMetric gets the float form of that
            # strategy: with "disable", torchmetrics 1.9 ignores the weights.
            cls, nan = (_METRIC[kind], "disable") if kind in _METRIC else (MeanMetric, float("nan"))
            self.metrics[name] = cls(dist_sync_on_step=True, nan_strategy=nan).to(device)
        return self.metrics[name]

    def reduce(self, values: dict[str, float], *, tokens: float, device: torch.device) -> dict[str, float]:
        """The cross-rank value of each metric of this step (``tokens``: this rank's token weight)."""
        if not is_distributed():  # one rank: every reduction is the identity (and torchmetrics costs ~7 ms)
            return dict(values)
        names = sorted(values)
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        names = sorted({name for rank_names in gathered for name in rank_names or []})
        out = {}
        for name in names:
            metric = self._metric(name, device)
            kind = reduction_of(name)
            present = name in values
            value = torch.tensor(values.get(name, 0.0), dtype=torch.float64, device=device)
            if kind in ("sum", "max", "min"):
                if not present:
                    value = torch.tensor(_NEUTRAL[kind], dtype=torch.float64, device=device)
                result = metric(value)
            else:
                weight = (tokens if kind == "token_mean" else 1.0) if present else 0.0
                result = metric(value, torch.tensor(weight, dtype=torch.float64, device=device))
            metric.reset()  # one value per step: no state carried between steps (flat memory)
            out[name] = float(result)
        return out


_NEUTRAL = {"sum": 0.0, "max": float("-inf"), "min": float("inf")}


def full_tensor(tensor: Tensor) -> Tensor:
    """The full value of a (possibly sharded, FSDP2 ``DTensor``) parameter; a plain tensor as is.

    For a rollout engine that keeps its own full copy of a sharded policy:
    ``target.copy_(full_tensor(param.detach()))``. Under FSDP2 this is a collective: every rank must
    call it for the same parameters in the same order.
    """
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def close_process_group() -> None:
    """Destroy the default process group once a run is over. Left to interpreter exit, gloo's worker
    threads can abort a finished process ("terminate called without an active exception", exit -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
