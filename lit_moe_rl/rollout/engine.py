"""Rollout engines: sample G completions per prompt and return what the trainer needs.

The interface is small on purpose so that a vLLM/SGLang engine can stand beside the Hugging Face
one: :meth:`RolloutEngine.bind` once with the policy, :meth:`RolloutEngine.generate` per step,
:meth:`RolloutEngine.sync_weights` after every optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_moe_rl.policy import DTYPES


@dataclass
class Generation:
    """Output of one :meth:`RolloutEngine.generate` call (``N = len(prompts) * n`` rows).

    ``input_ids`` follows the layout of :mod:`lit_moe_rl.batch`: prompt left-padded to ``prompt_len``,
    response right-padded to ``R``.
    """

    input_ids: Tensor  # [N, P+R] long
    attention_mask: Tensor  # [N, P+R] long
    response_mask: Tensor  # [N, R] bool, up to and including EOS
    prompt_len: int  # P
    infer_logp: Tensor  # [N, R] float32: the engine's log-prob of each sampled token (mu)
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    routes: Tensor | None = None  # [N, P+R, L, K] int8/int16, -1 = no route (when recorded)


class RolloutEngine(ABC):
    """Samples completions from the current policy weights."""

    @abstractmethod
    def bind(self, policy: nn.Module, tokenizer: Any) -> None:
        """Attach to the trainer's policy (copy or share its weights)."""

    @abstractmethod
    def generate(
        self, prompts: list[str], *, n: int, greedy: bool = False, record_routes: bool = False
    ) -> Generation:
        """``n`` completions for every prompt, prompt-major (rows ``[i*n, (i+1)*n)`` share prompt ``i``)."""

    @abstractmethod
    def sync_weights(self, policy: nn.Module) -> None:
        """Make the engine's weights equal the trainer's."""


def response_mask_from(tokens: Tensor, eos_token_id: int | list[int]) -> tuple[Tensor, Tensor]:
    """``(mask, truncated)`` for sampled ``tokens [N, R]``: True up to and including the first EOS."""
    eos = torch.as_tensor(eos_token_id, device=tokens.device).reshape(-1)
    is_eos = torch.isin(tokens, eos)  # [N, R]
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, ~is_eos.any(-1)


class HFEngine(RolloutEngine):
    """``transformers.generate`` with a KV cache, on the trainer's device.

    With ``dtype: same`` the engine shares the trainer's module (no copy, nothing to sync). With another
    dtype (``bfloat16`` rollout for an fp32 trainer: the real train/inference mismatch R3 exists to fix)
    it keeps its own copy, refreshed by :meth:`sync_weights` after each optimizer step.

    ``infer_logp`` is the log-softmax of the engine's raw logits divided by ``temperature``; top-p/top-k
    truncation is not folded in, so that it is comparable with the trainer's tempered log-probs.
    """

    def __init__(
        self,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        dtype: Literal["same", "float32", "bfloat16", "float16"] = "same",
        max_prompt_len: int | None = None,
    ) -> None:
        """
        Args:
            max_new_tokens: Most tokens sampled per completion.
            temperature: Sampling temperature (> 0); the trainer divides its logits by the same value.
            top_p: Nucleus sampling mass (0, 1].
            top_k: Keep only the top-k tokens when sampling (0 = off).
            dtype: Engine weights' dtype; ``same`` shares the trainer's module.
            max_prompt_len: Left-truncate longer prompts to this many tokens (None = no limit).
        """
        if max_new_tokens < 1:
            raise ValueError(f"rollout.engine.max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"rollout.engine.temperature: must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"rollout.engine.top_p: must be in (0, 1], got {top_p}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.dtype = dtype
        self.max_prompt_len = max_prompt_len
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    @property
    def shares_policy(self) -> bool:
        return self.dtype == "same"

    def bind(self, policy: nn.Module, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if self.shares_policy:
            self.model = policy
            return
        self.model = copy.deepcopy(policy).to(DTYPES[self.dtype]).eval().requires_grad_(False)

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        if self.shares_policy or self.model is None:
            return
        target = dict(self.model.named_parameters())
        for name, param in policy.named_parameters():
            target[name].copy_(param.detach())

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        enc = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=self.max_prompt_len is not None,
            max_length=self.max_prompt_len,
        )
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, n: int, greedy: bool = False, record_routes: bool = False
    ) -> Generation:
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind()")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            enc = self._encode(prompts, next(model.parameters()).device)
            with _maybe_record(model, record_routes) as rec:
                out = model.generate(**enc, **self._sampling_kwargs(n, greedy))
        finally:
            model.train(was_training)
        return self._to_generation(enc, out, rec)

    def _sampling_kwargs(self, n: int, greedy: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=n,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if greedy:
            return kwargs | dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs | dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def _to_generation(self, enc: dict[str, Tensor], out: Any, rec: Any) -> Generation:
        prompt_len = enc["input_ids"].shape[1]
        sequences = out.sequences  # [N, P+R]
        tokens = sequences[:, prompt_len:]  # [N, R]
        logits = torch.stack(out.logits, dim=1).float() / self.temperature  # [N, R, V]
        infer_logp = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, R]
        response_mask, truncated = response_mask_from(tokens, self.tokenizer.eos_token_id)
        n = sequences.shape[0] // enc["input_ids"].shape[0]
        prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        input_ids = sequences.masked_fill(attention_mask == 0, self.tokenizer.pad_token_id)
        routes = None
        if rec is not None:
            from lit_moe_rl.routing.record import align_generation_routes

            routes = align_generation_routes(rec.routes, attention_mask, sequences.shape[1])
        return Generation(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            prompt_len=prompt_len,
            infer_logp=infer_logp.masked_fill(~response_mask, 0.0),
            truncated=truncated,
            routes=routes,
        )


def _maybe_record(model: nn.Module, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    from lit_moe_rl.routing.record import record_routes

    return record_routes(model)
