"""Step statistics reduced by their kind, exactly, across micro-batches, mini-batches and ranks.

A logged value is declared where it is produced as one of:

- ``token_mean`` / ``seq_mean`` / ``mean``: a weighted mean, kept as ``(Σ value·weight, Σ weight)``
  with the weight the number of response tokens, of sequences, or 1 (values every rank shares);
- ``sum``: shares of one global quantity (the loss, normalised by the mini-batch's global count), counts;
- ``max`` / ``min``: extremes (a micro-batch without a token contributes nothing);
- ``std`` and quantiles: from the raw values, gathered over every micro-batch and rank.

Averaging per-micro-batch means by row share, or per-micro-batch maxima, makes a logged value depend on
how the batch is split although the loss does not; with these rules the value is the same for any
micro-batch size, with or without trimmed padding, and for W ranks of b rows as for one rank of W·b
(up to float rounding). The reduction over ranks is :meth:`Stats.reduce` with a
:class:`~lit_moe_rl.parallel.distributed.Collectives`: one all-reduce per kind and one gather of the raw values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lit_moe_rl.parallel.distributed import Collectives

MeanKind = Literal["token_mean", "seq_mean", "mean"]
Kind = Literal["token_mean", "seq_mean", "mean", "sum", "max", "min", "std", "quantile"]


@dataclass(frozen=True)
class Gathered:
    """Raw values ``[n]`` whose ``std`` (unbiased) or quantile ``q`` is computed once every micro-batch's
    and rank's values are gathered; ``empty`` is the value when there are none."""

    values: Tensor
    kind: Literal["std", "quantile"] = "std"
    q: float = 0.5
    empty: float = 0.0


@dataclass
class _Entry:
    kind: Kind
    num: float = 0.0  # mean: Σ value·weight; sum: the sum; max / min: the extreme
    den: float = 0.0  # mean: Σ weight; max / min: 1 once a value arrived
    parts: list[Tensor] = field(default_factory=list)  # std / quantile: the raw values
    q: float = 0.5
    empty: float = 0.0


_START = {"max": float("-inf"), "min": float("inf")}


class Stats:
    """An accumulator of named statistics, each with one kind for all its contributions."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def _entry(self, name: str, kind: Kind, **extra: float) -> _Entry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = _Entry(kind, num=_START.get(kind, 0.0), **extra)
        elif entry.kind != kind:
            raise ValueError(f"statistic {name}: declared {entry.kind}, then {kind}")
        return entry

    def mean(self, name: str, value: float | Tensor, weight: float, kind: MeanKind = "mean") -> None:
        """A weighted mean's contribution: ``value`` averaged over ``weight`` tokens / sequences / 1."""
        entry = self._entry(name, kind)
        if weight:
            entry.num += float(value) * weight
            entry.den += weight

    def sum(self, name: str, value: float | Tensor) -> None:
        self._entry(name, "sum").num += float(value)

    def extreme(
        self, name: str, value: float | Tensor, kind: Literal["max", "min"], count: float = 1.0
    ) -> None:
        """A maximum or minimum over ``count`` items (nothing when ``count`` is 0)."""
        entry = self._entry(name, kind)
        if count:
            pick = max if kind == "max" else min
            entry.num, entry.den = pick(entry.num, float(value)), 1.0

    def gathered(self, name: str, value: Gathered) -> None:
        entry = self._entry(name, value.kind, q=value.q, empty=value.empty)
        entry.parts.append(value.values.detach().reshape(-1).double().cpu())

    def add(self, name: str, value: float | Tensor | Gathered, kind: Kind, weight: float = 1.0) -> None:
        """One contribution of kind ``kind`` (``weight``: tokens, sequences or items it covers)."""
        if isinstance(value, Gathered):
            self.gathered(name, value)
        elif kind in ("max", "min"):
            self.extreme(name, value, kind, weight)
        elif kind == "sum":
            self.sum(name, value)
        else:
            self.mean(name, value, weight, kind)

    def scale(self, names: tuple[str, ...], factor: float) -> None:
        """Multiply the sums ``names`` (those present) by ``factor``: a sum over updates made their mean."""
        for name in names:
            entry = self.entries.get(name)
            if entry is not None and entry.kind == "sum":
                entry.num *= factor

    def merge(self, other: Stats) -> None:
        """Add ``other``'s contributions (each statistic keeps one kind)."""
        merge(self, other)

    def reduce(self, collectives: Collectives) -> dict[str, float]:
        """Every statistic's value over all contributions of all ranks (every rank must call it)."""
        entries = self._agreed(collectives)
        names = sorted(entries)
        out: dict[str, float] = {}
        means = [n for n in names if entries[n].kind in ("token_mean", "seq_mean", "mean")]
        packed = collectives.all_reduce([x for n in means for x in (entries[n].num, entries[n].den)], "sum")
        for i, name in enumerate(means):
            num, den = packed[2 * i], packed[2 * i + 1]
            out[name] = num / den if den else entries[name].empty
        for kind in ("sum", "max", "min"):
            these = [n for n in names if entries[n].kind == kind]
            for name, value in zip(
                these, collectives.all_reduce([entries[n].num for n in these], kind), strict=True
            ):
                unset = kind != "sum" and value == _START[kind]  # no rank had a value
                out[name] = entries[name].empty if unset else value
        for name in (n for n in names if entries[n].kind in ("std", "quantile")):
            entry = entries[name]
            local = torch.cat(entry.parts) if entry.parts else torch.zeros(0, dtype=torch.float64)
            out[name] = _spread(collectives.gather(local), entry)
        return {name: out[name] for name in names}

    def _agreed(self, collectives: Collectives) -> dict[str, _Entry]:
        """The union of every rank's names (a statistic one rank lacks still enters the collectives)."""
        mine = {name: (e.kind, e.q, e.empty) for name, e in self.entries.items()}
        entries = dict(self.entries)
        for theirs in collectives.gather_object(mine):
            for name, (kind, q, empty) in theirs.items():
                if name not in entries:
                    entries[name] = _Entry(kind, num=_START.get(kind, 0.0), q=q, empty=empty)
        return entries


def _spread(values: Tensor, entry: _Entry) -> float:
    """The unbiased std, or the linearly interpolated quantile (as ``torch.quantile``), of ``values``."""
    if values.numel() == 0:
        return entry.empty
    if entry.kind == "std":
        return float(values.std()) if values.numel() > 1 else 0.0
    ordered = values.sort().values
    pos = entry.q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def named_kind(name: str) -> Kind:
    """The kind of a metric known only by name (callbacks' scalars, the rollout's ``extras``):
    :func:`~lit_moe_rl.parallel.distributed.reduction_of`, with ``token_mean`` weighted by the step's tokens."""
    from lit_moe_rl.parallel.distributed import reduction_of

    return reduction_of(name)


def add_named(stats: Stats, values: dict[str, float | Tensor | Gathered], tokens: float) -> None:
    """Add per-rank scalars known by name: token means weighted by this rank's ``tokens``, plain means by 1."""
    for name, value in values.items():
        kind = "std" if isinstance(value, Gathered) else named_kind(name)
        stats.add(name, value, kind, tokens if kind == "token_mean" else 1.0)


def merge(into: Stats, other: Stats) -> None:
    """Add ``other``'s contributions to ``into`` (statistics of one kind each)."""
    for name, entry in other.entries.items():
        mine = into._entry(name, entry.kind, q=entry.q, empty=entry.empty)
        if entry.kind in ("max", "min"):
            if entry.den:
                pick = max if entry.kind == "max" else min
                mine.num, mine.den = pick(mine.num, entry.num), 1.0
        else:
            mine.num += entry.num
            mine.den += entry.den
            mine.parts.extend(entry.parts)
