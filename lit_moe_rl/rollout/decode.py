"""The rollout engine's decode loop: the model's own forward with a KV cache, one sampled token per step.

Choices made here (and why):

* **Prefill once per prompt.** The ``B`` prompts run one prefill, then the KV cache and the last
  hidden state are repeated ``n`` times (HF ``generate`` expands to ``B*n`` rows *before* prefill).
  The ``n`` completions of a prompt then share its prefill exactly, so their prompt routes (R3) are
  identical by construction. The prefill's experts skip the left padding
  (:func:`lit_moe_rl.experts.real_tokens_only`, as the trainer's forwards do, unless
  ``model.skip_padding`` is off): no real token reads a padding position, so every real token's output
  is unchanged (bitwise on CPU; on a GPU the grouped matmul may tile fewer rows differently).
* **Only ``[A, V]`` logits are alive.** Decoder and LM head are called separately (as
  :func:`lit_moe_rl.policy.token_logprobs` does), and the head only sees the last position; each
  step samples and keeps the sampled token's log-prob (:mod:`lit_moe_rl.rollout.sampling`).
* **Finished rows leave the batch.** A row that sampled any EOS id is dropped from the batch and
  its KV cache (``batch_select_indices``); the loop ends when no row is left or after
  ``max_new_tokens``. Nothing runs past a row's EOS. When routes are recorded, a finished row is
  fed its EOS once more before it leaves, so that every real token but the row's last position
  has a route, as HF ``generate`` recorded them; its logits are never computed and nothing is
  sampled for it, so recording routes does not change what the other rows sample.
* **Positions and masks as ``generate`` builds them for left-padded prompts:** a 2-D attention
  mask that grows by one column per step (a view of one ``[N, P + max_new_tokens]`` buffer: no per-step
  copy of ``P + t`` columns, which ``torch.cat`` made), position ids ``cumsum(mask) - 1`` for the prompt and
  ``last + 1`` per step (:func:`lit_moe_rl.policy.position_ids_from_mask`, the trainer's rule).
* **The model's own kernels.** The loop keeps the policy's experts and attention implementations
  (``model.experts_implementation``: :mod:`lit_moe_rl.experts`, whose forward is ``grouped_mm``'s
  bit for bit; ``sdpa`` attention): ``grouped_mm`` experts and ``sdpa`` were the fastest on CPU for a
  tiny Qwen3-MoE (``eager`` experts about 5% and ``eager`` attention about 20% slower,
  ``batched_mm`` 2.8x slower, which gathers a weight copy per token), and a shared (``dtype:
  same``) engine must not change the trainer's numerics.
* **The KV cache written in place, with a ready mask** (:data:`IN_PLACE`). Where every layer is full
  attention through ``sdpa``, the cache's buffers are sized after the prefill for
  :data:`RESERVED_NEW` new tokens at most (:meth:`~lit_moe_rl.rollout.kv.GrowingLayer.reserve`; longer
  generations double them from there, so memory follows what is generated, within 2x): a step writes
  its keys and values into them and attention reads the filled part as a view, where transformers'
  cache concatenates (copies) the whole cache every step. When a prompt is left-padded, the step's mask
  is a view of one ``[N, 1, 1, P + max_new_tokens]`` bool buffer, the 4-D mask transformers builds for
  ``sdpa`` from the 2-D one, so the model builds none; without padding the model gets no mask, as
  transformers passes none there. Together 5-7% faster per decode (``bench/vs_trl.py``'s shape, 16-30
  alternations; in-place writes alone or a ready mask alone gave 0-3%). Other models (sliding
  windows, ``eager`` or flash attention, whose masks differ) keep the 2-D mask and transformers'
  cache, which grows by doubling from ``GROW_FROM`` new tokens on (:mod:`lit_moe_rl.rollout.kv`):
  concatenation copies ``L^2 / 2`` positions for ``L`` tokens.
* **One read of the device per step**: which sampled tokens are EOS and how many rows had NaN/inf
  probabilities (``.tolist()``; such rows are never drawn from, see
  :func:`~lit_moe_rl.rollout.sampling.sample_step_flagged`); which rows are live, leave or stay is
  decided on the host from it (each ``.any()``/``bool()`` on a device tensor
  is a stall on a GPU). A test counts the reads outside the model's forward.
* **R3 inside the loop.** With a :class:`~lit_moe_rl.routing.record.RouteRecorder`, every forward's
  routes are written at the rows and positions that call fed, into ``[N, P + R, L, K]`` filled with
  -1: left padding, the last position (its token is never fed forward) and positions after a
  row's EOS keep -1 ("no route").
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lit_moe_rl.experts import real_tokens_only
from lit_moe_rl.policy import cache_kwarg, position_ids_from_mask
from lit_moe_rl.rollout.kv import use_growing_layers
from lit_moe_rl.rollout.sampling import SamplingParams, raise_non_finite, sample_step_flagged

__all__ = ["Decoded", "decode"]


@dataclass
class Decoded:
    """What :func:`decode` sampled for ``N = B * n`` rows (prompt-major)."""

    tokens: Tensor  # [N, R] long: sampled tokens, pad after a row's first EOS; R = the longest row
    logp: Tensor  # [N, R] float32: μ of each sampled token, 0 where none was sampled
    routes: Tensor | None  # [N, P + R, L, K] route ids, -1 = no route (when a recorder was given)


IN_PLACE = True
""":func:`decode` writes the KV cache in place and hands the model ready 4-D masks where it can
(:meth:`_Stepper.can_write_in_place`; module docstring). ``bench/decode_length.py`` turns it off to time
transformers' concatenating cache."""

RESERVED_NEW = 256
"""New tokens the in-place cache has room for after the prefill; beyond, its buffers double."""

GROW_FROM = 256
"""Where the cache is not written in place, generations that may add this many tokens or more keep it in
doubling buffers (:mod:`lit_moe_rl.rollout.kv`): no per-step copy of the whole cache. Shorter ones
keep transformers' concatenating cache, which was faster for short sequences on CPU with 2-D masks
(the quickstart's 12 tokens)."""


class _Stepper:
    """Runs the decoder on some rows and returns the last position's hidden state ``[A, H]``.

    ``in_place`` (asked by :func:`decode`, granted by :meth:`can_write_in_place`): the cache's layers
    are :class:`~lit_moe_rl.rollout.kv.GrowingLayer` for :meth:`reserve`, and the caller feeds 4-D masks.
    ``skip_padding``: prefills skip the experts on padding (``model.skip_padding``, through the engine)."""

    def __init__(
        self, model: nn.Module, max_added: int = 0, *, in_place: bool = False, skip_padding: bool = True
    ) -> None:
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.cache = DynamicCache(config=model.config)
        self.skip_padding = skip_padding
        self.in_place = in_place and self.can_write_in_place(self.decoder, self.cache)
        if self.in_place or max_added >= GROW_FROM:
            use_growing_layers(self.cache)
        self.cache_kwarg = cache_kwarg(self.decoder)

    @staticmethod
    def can_write_in_place(decoder: nn.Module, cache: DynamicCache) -> bool:
        """Full attention in every layer (plain ``DynamicLayer``s) through ``sdpa`` (the decoder's own
        config), whose 4-D mask is the bool ``[A, 1, 1, kv]`` one a decode step's mask is a view of
        (``eager`` adds float masks; flash attention takes 2-D ones; a sliding window masks more)."""
        attention = getattr(decoder.config, "_attn_implementation", None)
        return attention == "sdpa" and all(type(layer) is DynamicLayer for layer in cache.layers)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, host_mask: Tensor) -> Tensor:
        """The prompts' forward ``[B, P]``: the last position's hidden state ``[B, H]``, with the experts
        skipping the left padding (:func:`lit_moe_rl.experts.real_tokens_only`: exact for every real
        token, whose attention never reads a padding position). ``host_mask``: ``attention_mask`` on the
        host, where the real tokens are indexed without a device read."""
        with self.real_tokens(host_mask):
            return self(input_ids, attention_mask, position_ids_from_mask(attention_mask))

    def real_tokens(self, host_mask: Tensor | None) -> AbstractContextManager:
        """Within, a forward of ``host_mask``'s ``[B, S]`` tokens skips the experts where it is 0, unless
        ``skip_padding`` is off (:func:`lit_moe_rl.experts.real_tokens_only`; None: every token)."""
        return real_tokens_only(host_mask if self.skip_padding else None)

    def reserve(self, capacity: int) -> None:
        """Size every layer's buffers for ``capacity`` positions (after the prefill)."""
        for layer in self.cache.layers:
            layer.reserve(capacity)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        return out.last_hidden_state[:, -1]


@dataclass
class _Batch:
    """The rows still in the decode batch (``A`` of them) and what each needs for its next forward.

    Which rows are live is kept on the host: the loop reads the device once per step (which sampled
    tokens are EOS) and decides everything else from that.
    """

    rows: Tensor  # [A] long: output row of each batch row
    live: list[bool]  # still sampling (False: fed its EOS once more for R3, then leaves)
    full_mask: Tensor | None  # [A, P + max_new_tokens] (in place: bool [A, 1, 1, P + max_new_tokens], or
    # None without padding): the prompt's mask, then ones
    width: int  # columns of ``full_mask`` in the KV cache so far (P + t)
    next_pos: Tensor  # [A, 1] position id of the next token fed

    @property
    def mask(self) -> Tensor | None:
        """``[A, P + t]`` (or ``[A, 1, 1, P + t]``) attention mask: a view, so a step copies nothing that
        grows with the length."""
        return None if self.full_mask is None else self.full_mask[..., : self.width]

    def keep(self, kept: list[int], step: _Stepper) -> Tensor:
        """Keep batch rows ``kept`` (and their KV cache); returns their index on the device."""
        index = torch.tensor(kept, dtype=torch.long, device=self.rows.device)
        self.rows, self.next_pos = self.rows[index], self.next_pos[index]
        self.full_mask = None if self.full_mask is None else self.full_mask[index]
        self.live = [self.live[i] for i in kept]
        step.cache.batch_select_indices(index)
        return index


def _prompt_routes(recorder, attention_mask: Tensor, n: int, width: int) -> Tensor:
    """``[B*n, width, L, K]`` filled with -1 but for the prefill's routes at non-padding prompt positions."""
    prompt = recorder.take().repeat_interleave(n, dim=0)  # [N, P, L, K]
    routes = prompt.new_full((prompt.shape[0], width, *prompt.shape[2:]), -1)
    routes[:, : prompt.shape[1]] = prompt.masked_fill(
        attention_mask.repeat_interleave(n, 0)[..., None, None] == 0, -1
    )
    return routes


def _sample_live(
    step: _Stepper,
    hidden: Tensor,
    batch: _Batch,
    params: SamplingParams,
    tokens: Tensor,
    logp: Tensor,
    t: int,
) -> tuple[Tensor, Tensor]:
    """Sample column ``t`` for the live rows only: ``[A]`` tokens (0 at rows fed their EOS) and the count
    of live rows whose probabilities were NaN or inf (a 0-dim tensor, read with the step's EOS test).

    Rows kept only to feed their EOS once more (R3) are neither scored nor sampled: sampling them
    would draw random numbers the same run without recording does not draw, and shift every later
    sample (R3-on and R3-off runs with one seed must sample the same completions).
    """
    if all(batch.live):  # always so without a recorder: the exact tensors of a loop without R3
        token, token_logp, bad = sample_step_flagged(step.head(hidden), params)
        tokens[batch.rows, t], logp[batch.rows, t] = token, token_logp
        return token, bad.sum()
    live = torch.tensor([i for i, alive in enumerate(batch.live) if alive], device=hidden.device)
    live_token, live_logp, bad = sample_step_flagged(step.head(hidden[live]), params)
    tokens[batch.rows[live], t], logp[batch.rows[live], t] = live_token, live_logp
    return torch.zeros_like(batch.rows).index_copy(0, live, live_token), bad.sum()


@torch.inference_mode()
def decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    n: int,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    recorder=None,
    skip_padding: bool = True,
) -> Decoded:
    """Sample ``max_new_tokens`` at most for each of the ``n`` copies of every left-padded prompt.

    Runs under ``torch.inference_mode`` (about 10% faster than ``no_grad`` on CPU here): the
    returned tensors are inference tensors, so clone or transform them before autograd sees them.
    ``input_ids``/``attention_mask`` are ``[B, P]``; rows ``[i*n, (i+1)*n)`` of the output belong to
    prompt ``i``. ``recorder`` is an active :class:`~lit_moe_rl.routing.record.RouteRecorder` (R3).
    ``skip_padding``: the prefill's experts skip the prompts' left padding (``model.skip_padding``).
    """
    host_mask = attention_mask.cpu()  # the prompts' mask, read once: left padding, any padding, real tokens
    left_padded, unpadded = torch.stack([host_mask[:, -1].all(), host_mask.all()]).tolist()
    if not left_padded:
        raise ValueError("rollout.engine: prompts must be left-padded (tokenizer.padding_side='left')")
    prompt_len, rows, device = input_ids.shape[1], input_ids.shape[0] * n, input_ids.device
    eos = torch.tensor(sorted(set(eos_token_ids)), device=device)
    step = _Stepper(model, max_new_tokens, in_place=IN_PLACE, skip_padding=skip_padding)
    positions = position_ids_from_mask(attention_mask)
    hidden = step.prefill(input_ids, attention_mask, host_mask).repeat_interleave(n, dim=0)  # [N, H]
    routes = (
        None if recorder is None else _prompt_routes(recorder, attention_mask, n, prompt_len + max_new_tokens)
    )
    step.cache.batch_repeat_interleave(n)
    full_mask = torch.cat(
        [attention_mask, attention_mask.new_ones((attention_mask.shape[0], max_new_tokens))], dim=1
    ).repeat_interleave(n, dim=0)
    if step.in_place:
        step.reserve(prompt_len + min(max_new_tokens, RESERVED_NEW))
        full_mask = None if unpadded else full_mask.bool()[:, None, None, :]  # as transformers masks sdpa
    batch = _Batch(
        rows=torch.arange(rows, device=device),
        live=[True] * rows,
        full_mask=full_mask,
        width=prompt_len,
        next_pos=positions[:, -1:].repeat_interleave(n, dim=0) + 1,
    )
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logp = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    steps = 0  # columns sampled so far: R of the output
    for t in range(max_new_tokens):
        if not any(batch.live):
            break  # the batch only held rows fed their EOS for its route
        token, bad = _sample_live(step, hidden, batch, params, tokens, logp, t)  # [A], []
        steps = t + 1
        *is_eos, bad = torch.cat([torch.isin(token, eos).long(), bad[None]]).tolist()  # the step's one read
        if bad:
            raise_non_finite(bad, sum(batch.live))
        ended = [alive and e for alive, e in zip(batch.live, is_eos, strict=True)]
        keep = (
            batch.live
            if recorder is not None
            else [a and not e for a, e in zip(batch.live, ended, strict=True)]
        )
        batch.live = [a and not e for a, e in zip(batch.live, ended, strict=True)]  # R3: an EOS is fed once
        if t == max_new_tokens - 1 or not any(keep):
            break
        if not all(keep):
            token = token[batch.keep([i for i, k in enumerate(keep) if k], step)]
        batch.width += 1
        hidden = step(token[:, None], batch.mask, batch.next_pos)
        batch.next_pos = batch.next_pos + 1
        if recorder is not None:
            routes[batch.rows, prompt_len + t] = recorder.take()[:, 0].to(routes.device)
    routes = None if routes is None else routes[:, : prompt_len + steps]
    return Decoded(tokens=tokens[:, :steps], logp=logp[:, :steps], routes=routes)
