"""GRPO-family algorithms: small typed classes holding hyperparameters and calling :mod:`losses`.

Chosen in YAML by ``class_path`` (``model.algorithm``). Each class turns rewards into advantages and
per-micro-batch tensors into a loss; the module does the rest (forwards, accumulation, steps).

| class   | advantages        | objective                                  | defaults                        |
|---------|-------------------|--------------------------------------------|---------------------------------|
| GRPO    | group mean / std  | token-clipped ratio, ``agg`` aggregation   | clip 0.2 / 0.2, token-mean      |
| DAPO    | group mean / std  | GRPO + clip-higher + dynamic sampling      | clip 0.2 / 0.28, token-mean     |
| DrGRPO  | group mean only   | GRPO, sum over tokens / constant           | seq-mean-token-sum-norm         |
| GSPO    | group mean / std  | sequence ratio, sequence clip (GSPO-token) | clip 3e-4 / 4e-4                |
| GMPO    | group mean / std  | geometric mean of log-space clipped ratios | clip 0.4 / 0.4 (log space)      |
| RSPO    | group mean / std  | GMPO with router-shift weighting (v2)      | GMPO's, floor 0.8               |

``router_shift: true`` adds RSPO's router-shift weight ``log γ̃`` to the token log-ratio *before*
clipping (RSPO v2 placement, docs/algorithms.md §4.3) for GRPO, DAPO, DrGRPO and GSPO too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

from torch import Tensor

from lit_moe_rl import advantages as adv
from lit_moe_rl import losses

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3", "k3+"]


class Algorithm(ABC):
    """Abstract base: GRPO advantages; subclasses define :meth:`objective` (not selectable in YAML)."""

    name = "base"
    # how each statistic of :meth:`objective` combines across micro-batches and ranks (losses.py)
    stat_kinds: dict[str, str] = losses.GRPO_STAT_KINDS

    def __init__(
        self,
        clip_low: float,
        clip_high: float,
        *,
        norm_adv_by_std: bool = True,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        router_shift_layer_reduce: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
        dynamic_sampling: bool = False,
    ) -> None:
        for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"model.algorithm.{name}: must be >= 0, got {value}")
        if not 0.0 <= router_shift_floor <= 1.0:
            raise ValueError(
                f"model.algorithm.router_shift_floor: must be in [0, 1], got {router_shift_floor}"
            )
        if router_shift_layer_reduce not in ("mean", "sum"):
            raise ValueError(
                "model.algorithm.router_shift_layer_reduce: must be 'mean' or 'sum', "
                f"got {router_shift_layer_reduce!r}"
            )
        if not kl_coef >= 0:
            raise ValueError(f"model.algorithm.kl_coef: must be >= 0, got {kl_coef}")
        if kl_kind not in losses.KL_KINDS:
            raise ValueError(
                f"model.algorithm.kl_kind: must be one of {', '.join(losses.KL_KINDS)}, got {kl_kind!r}"
            )
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.norm_adv_by_std = norm_adv_by_std
        self.router_shift = router_shift
        self.router_shift_floor = router_shift_floor
        self.router_shift_layer_reduce = router_shift_layer_reduce
        self.kl_coef = kl_coef
        self.kl_kind = kl_kind
        self.dynamic_sampling = dynamic_sampling

    def advantages(self, rewards: Tensor, group_size: int) -> Tensor:
        """Group-relative advantages ``[N]`` (GRPO; mean-only when ``norm_adv_by_std`` is off)."""
        if self.norm_adv_by_std:
            return adv.grpo_advantages(rewards, group_size)
        return adv.drgrpo_advantages(rewards, group_size)

    def keep_groups(self, rewards: Tensor, group_size: int) -> Tensor | None:
        """DAPO dynamic sampling: rows to keep ``[N]`` bool, or None to keep all."""
        return adv.group_filter_mask(rewards, group_size) if self.dynamic_sampling else None

    @abstractmethod
    def objective(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        log_weight: Tensor | None,
        token_weight: Tensor | None,
        num_tokens: float,
        num_seqs: float,
        norm_const: float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch and its ``policy/*`` statistics."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clip_low={self.clip_low}, clip_high={self.clip_high})"


class GRPO(Algorithm):
    """GRPO (Shao et al. 2024, DeepSeekMath) with a configurable aggregation (docs/algorithms.md §2.1)."""

    name = "grpo"

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        agg: AggMode = "token-mean",
        clip_ratio_c: float | None = None,
        norm_adv_by_std: bool = True,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        router_shift_layer_reduce: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
        dynamic_sampling: bool = False,
    ) -> None:
        """
        Args:
            clip_low: epsilon_low in [0, 1): the ratio is clipped below at 1 - clip_low.
            clip_high: epsilon_high >= 0: the ratio is clipped above at 1 + clip_high (DAPO clip-higher).
            agg: Loss aggregation over tokens and sequences (docs/algorithms.md §2.1).
            clip_ratio_c: Dual-clip constant > 1 for negative advantages (None = off, §2.4).
            norm_adv_by_std: Divide group-centred rewards by the group std (off = Dr. GRPO).
            router_shift: Add RSPO's router-shift weight before clipping (arXiv 2510.23027 v2).
            router_shift_floor: gamma_min in [0, 1], the floor of the router-shift ratio.
            router_shift_layer_reduce: How per-layer shifts combine: mean (paper) or sum.
            kl_coef: beta >= 0 of the per-token reference KL loss term (needs ReferenceKLCallback).
            kl_kind: KL estimator for that term.
            dynamic_sampling: Drop groups whose rewards are all equal (DAPO).
        """
        super().__init__(
            clip_low,
            clip_high,
            norm_adv_by_std=norm_adv_by_std,
            router_shift=router_shift,
            router_shift_floor=router_shift_floor,
            router_shift_layer_reduce=router_shift_layer_reduce,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            dynamic_sampling=dynamic_sampling,
        )
        if agg not in losses.AGG_MODES:
            raise ValueError(
                f"model.algorithm.agg: must be one of {', '.join(losses.AGG_MODES)}, got {agg!r}"
            )
        if not clip_low < 1:
            raise ValueError(
                f"model.algorithm.clip_low: must be < 1 (the ratio's floor is 1 - clip_low), got {clip_low}"
            )
        if clip_ratio_c is not None and not clip_ratio_c > 1:
            raise ValueError(
                f"model.algorithm.clip_ratio_c: must be > 1 (dual-clip) or null, got {clip_ratio_c}"
            )
        self.agg = agg
        self.clip_ratio_c = clip_ratio_c

    def objective(
        self, logp, old_logp, advantages, mask, *, log_weight, token_weight, num_tokens, num_seqs, norm_const
    ):
        return losses.grpo_loss(
            logp,
            old_logp,
            advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            agg=self.agg,
            log_weight=log_weight,
            token_weight=token_weight,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            norm_const=norm_const,
            clip_ratio_c=self.clip_ratio_c,
        )


class DAPO(GRPO):
    """DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher, token-level loss, dynamic sampling."""

    name = "dapo"

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        agg: AggMode = "token-mean",
        clip_ratio_c: float | None = None,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
        dynamic_sampling: bool = True,
    ) -> None:
        super().__init__(
            clip_low,
            clip_high,
            agg,
            clip_ratio_c,
            router_shift=router_shift,
            router_shift_floor=router_shift_floor,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            dynamic_sampling=dynamic_sampling,
        )


class DrGRPO(GRPO):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): mean-only advantages, sum / constant aggregation.

    The constant is the rollout engine's ``max_new_tokens``.
    """

    name = "drgrpo"

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
    ) -> None:
        super().__init__(
            clip_low,
            clip_high,
            "seq-mean-token-sum-norm",
            norm_adv_by_std=False,
            router_shift=router_shift,
            router_shift_floor=router_shift_floor,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
        )


class SequenceObjective(Algorithm):
    """Abstract, shared by GSPO and GMPO: a per-sequence objective normalised by the global sequence count."""

    @staticmethod
    @abstractmethod
    def loss_fn(*args: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The pure sequence-level loss of :mod:`losses` (set by the subclass)."""

    def objective(
        self, logp, old_logp, advantages, mask, *, log_weight, token_weight, num_tokens, num_seqs, norm_const
    ):
        return type(self).loss_fn(
            logp,
            old_logp,
            advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            log_weight=log_weight,
            token_weight=token_weight,
            num_seqs=num_seqs,
        )


class GSPO(SequenceObjective):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), GSPO-token form: sequence ratio, sequence clip."""

    name = "gspo"
    loss_fn = staticmethod(losses.gspo_loss)
    stat_kinds = losses.GSPO_STAT_KINDS

    def __init__(
        self,
        clip_low: float = 3e-4,
        clip_high: float = 4e-4,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        router_shift_layer_reduce: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
    ) -> None:
        super().__init__(
            clip_low,
            clip_high,
            router_shift=router_shift,
            router_shift_floor=router_shift_floor,
            router_shift_layer_reduce=router_shift_layer_reduce,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
        )
        if not clip_low < 1:  # the sequence ratio's floor 1 - clip_low must stay positive
            raise ValueError(
                "model.algorithm.clip_low: GSPO clips the sequence ratio to [1 - clip_low, 1 + clip_high], so "
                f"clip_low must be < 1 (the GSPO paper uses 3e-4), got {clip_low}"
            )


class GMPO(SequenceObjective):
    """GMPO (Zhao et al. 2025, arXiv 2507.20673): geometric mean of sign-aware log-space clipped ratios.

    The GMPO authors warn that a wide clip destabilises MoE training; lower ``clip_low/high`` for MoE.
    """

    name = "gmpo"
    loss_fn = staticmethod(losses.gmpo_loss)
    stat_kinds = losses.GMPO_STAT_KINDS

    def __init__(
        self,
        clip_low: float = 0.4,
        clip_high: float = 0.4,
        router_shift: bool = False,
        router_shift_floor: float = 0.8,
        router_shift_layer_reduce: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
    ) -> None:
        super().__init__(
            clip_low,
            clip_high,
            router_shift=router_shift,
            router_shift_floor=router_shift_floor,
            router_shift_layer_reduce=router_shift_layer_reduce,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
        )


class RSPO(GMPO):
    """RSPO (Zhang et al., arXiv 2510.23027 v2 / ACL 2026) = GMPO + router-shift weighting.

    Per response token, ``γ = exp(-mean_l mean_k |log r_θ - log r_old|)`` over the old top-K experts,
    floored at ``router_shift_floor`` and detached, multiplies the token ratio *before* the log-space
    clip (v2 placement; v1's after-clip form is not implemented, see docs/algorithms.md §4.3).
    """

    name = "rspo"

    def __init__(
        self,
        clip_low: float = 0.4,
        clip_high: float = 0.4,
        router_shift_floor: float = 0.8,
        router_shift_layer_reduce: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
        kl_kind: KLKind = "k3",
    ) -> None:
        super().__init__(
            clip_low,
            clip_high,
            router_shift=True,
            router_shift_floor=router_shift_floor,
            router_shift_layer_reduce=router_shift_layer_reduce,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
        )
