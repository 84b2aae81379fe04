"""ReferenceKLCallback: a frozen reference policy π_ref for the per-token KL term and ``ref/*`` metrics.

It owns the reference model's lifecycle. π_ref is the policy's *initial* weights, across resumes:

- under LoRA, the base model with the adapter disabled (no second copy);
- a separate local checkpoint when ``pretrained`` is given;
- otherwise a frozen copy of the policy in a fresh run; in a resumed run (Lightning has loaded the
  resumed weights into the policy by ``on_fit_start``) or a sharded one (FSDP2 modules cannot be
  deep-copied), the initial policy rebuilt from ``model.pretrained`` / ``model.config`` with the seed the
  policy was first built with and sharded like it
  (:meth:`~lit_moe_rl.module.MoERLModule.initial_policy`).

The learner scores π_ref once per rollout, in the old-log-prob pass, through :meth:`reference_logprobs`;
the loss term is ``algorithm.kl_coef · KL_kind(π_θ‖π_ref)`` (DeepSeekMath's per-token k3 form, docs/algorithms.md §2.1). With
``kl_coef: 0`` there is no reference forward at all unless ``monitor`` asks for the ``ref/kl`` metric.
The reference routes natively (it never replays, as slime does) unless the routing-replay callback is
told to replay it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lit_moe_rl.batch import Rollout
from lit_moe_rl.parallel.unshard import fsdp_units
from lit_moe_rl.policy import load_policy, resolve_pretrained, token_logprobs

if TYPE_CHECKING:
    from lit_moe_rl.learner import Learner


class ReferenceKLCallback(Callback):
    """Provides ``Rollout.ref_logp`` and logs ``ref/kl`` (k3 of π_old against π_ref)."""

    def __init__(self, pretrained: str | None = None, monitor: bool = False) -> None:
        """
        Args:
            pretrained: Local folder of the reference model; default: the policy's initial weights.
            monitor: Score π_ref and log ``ref/kl`` even when ``algorithm.kl_coef`` is 0 (one reference
                forward per rollout); off, a ``kl_coef: 0`` run has no reference model at all.
        """
        if pretrained is not None:
            with _renamed_setting():
                resolve_pretrained(
                    pretrained
                )  # a missing folder fails at start-up, under this setting's name
        self.pretrained = pretrained
        self.monitor = monitor
        self.model: torch.nn.Module | None = None
        self._use_disabled_adapter = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.algorithm.kl_coef == 0 and not self.monitor:
            return  # nothing reads π_ref: no model, no forward
        policy = pl_module.policy
        if self.pretrained is not None:
            with _renamed_setting():
                self.model, _ = load_policy(self.pretrained, dtype=pl_module.hparams.dtype)
            self.model.to(pl_module.device)
        elif hasattr(policy, "disable_adapter"):
            self._use_disabled_adapter = True
        elif trainer.ckpt_path is None and not fsdp_units(policy):
            self.model = copy.deepcopy(policy)  # a fresh, unsharded run: the policy is the initial one
        else:  # resumed (the policy holds the restored weights) or sharded (FSDP2 cannot be deep-copied)
            self.model = pl_module.initial_policy()
        if self.model is not None:
            self.model.eval().requires_grad_(False)
        pl_module.learner.reference = self

    @torch.no_grad()
    def reference_logprobs(self, learner: Learner, micro: Rollout) -> Tensor:
        """π_ref log-probs ``[n, R]`` of ``micro``'s response tokens (phase ``ref`` forward contexts)."""
        model = learner.policy if self._use_disabled_adapter else self.model
        adapter_off = (
            learner.policy.disable_adapter() if self._use_disabled_adapter else contextlib.nullcontext()
        )
        with adapter_off, learner.forward_context("ref", micro):
            logp, _, _ = token_logprobs(
                model,
                micro.input_ids,
                micro.attention_mask,
                micro.prompt_len,
                temperature=micro.temperature,
                chunk_size=learner.settings.logprob_chunk_size,
                prefix=micro.shared_prefix,
                skip_padding=learner.skips_padding,  # as the run summary's compute: line says
            )
        return logp


SETTING = "ReferenceKLCallback.pretrained"


@contextlib.contextmanager
def _renamed_setting() -> Iterator[None]:
    """The reference model's load errors name this callback's ``pretrained``, not the policy's ``model.pretrained``."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        if message.startswith("model.pretrained:"):
            raise ValueError(SETTING + message[len("model.pretrained") :]) from None
        raise
