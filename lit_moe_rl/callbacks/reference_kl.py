"""ReferenceKLCallback: a frozen reference policy π_ref for the per-token KL term and ``ref/*`` metrics.

It owns the reference model's lifecycle: a frozen copy of the policy at the start of training (or,
under LoRA, the base model with the adapter disabled, which costs no memory), or a separate local
checkpoint. The module scores π_ref once per rollout, in the old-log-prob pass, through
:meth:`reference_logprobs`; the loss term is ``algorithm.kl_coef · KL_kind(π_θ‖π_ref)``
(docs/algorithms.md §2.1). The reference routes natively (it never replays, as slime does) unless the
routing-replay callback is told to replay it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lit_moe_rl.batch import Rollout
from lit_moe_rl.policy import load_policy, token_logprobs


class ReferenceKLCallback(Callback):
    """Provides ``Rollout.ref_logp`` and logs ``ref/kl`` (k3 of π_old against π_ref)."""

    def __init__(self, pretrained: str | None = None) -> None:
        """
        Args:
            pretrained: Local folder of the reference model; default: the policy's initial weights.
        """
        self.pretrained = pretrained
        self.model: torch.nn.Module | None = None
        self._use_disabled_adapter = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = pl_module.policy
        if self.pretrained is not None:
            self.model, _ = load_policy(self.pretrained, dtype=pl_module.hparams.dtype)
            self.model.to(pl_module.device)
        elif hasattr(policy, "disable_adapter"):
            self._use_disabled_adapter = True
        else:
            self.model = copy.deepcopy(policy)
        if self.model is not None:
            self.model.eval().requires_grad_(False)
        pl_module.reference = self

    @torch.no_grad()
    def reference_logprobs(self, pl_module: Any, micro: Rollout) -> Tensor:
        """π_ref log-probs ``[n, R]`` of ``micro``'s response tokens (phase ``ref`` forward contexts)."""
        model = pl_module.policy if self._use_disabled_adapter else self.model
        adapter_off = (
            pl_module.policy.disable_adapter() if self._use_disabled_adapter else contextlib.nullcontext()
        )
        with adapter_off, pl_module.forward_context("ref", micro):
            logp, _, _ = token_logprobs(
                model,
                micro.input_ids,
                micro.attention_mask,
                micro.prompt_len,
                temperature=micro.temperature,
                chunk_size=pl_module.hparams.logprob_chunk_size,
            )
        return logp
