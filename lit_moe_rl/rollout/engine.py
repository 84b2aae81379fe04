"""Rollout engines: sample G completions per prompt and return what the trainer needs.

The interface is small on purpose so that a vLLM/SGLang engine can stand beside the Hugging Face
one: :meth:`RolloutEngine.bind` once with the policy, :meth:`RolloutEngine.generate` per step,
:meth:`RolloutEngine.sync_weights` after every optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_moe_rl.policy import DTYPES
from lit_moe_rl.rollout.decode import Decoded, decode
from lit_moe_rl.rollout.env import Environment
from lit_moe_rl.rollout.env_runner import run_concurrently
from lit_moe_rl.rollout.env_workers import EnvPool
from lit_moe_rl.rollout.multiturn import (
    Trajectory,
    TurnLimits,
    cache_columns,
    check_window,
    decode_trajectories,
)
from lit_moe_rl.rollout.observations import ObservationEncoder
from lit_moe_rl.rollout.prompts import Prompt, encode_prompts
from lit_moe_rl.rollout.sampling import SamplingParams
from lit_moe_rl.rollout.waves import concat_generations, plan_waves
from lit_moe_rl.rollout.weights import inference_copy, sync_into

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Output of one :meth:`RolloutEngine.generate` call (``N = len(prompts) * n`` rows).

    ``input_ids`` follows the layout of :mod:`lit_moe_rl.batch`: prompt left-padded to ``prompt_len``,
    response right-padded to ``R`` (the longest response, at most ``max_new_tokens``).
    """

    input_ids: Tensor  # [N, P+R] long
    attention_mask: Tensor  # [N, P+R] long
    response_mask: Tensor  # [N, R] bool, up to and including EOS
    prompt_len: int  # P
    infer_logp: Tensor  # [N, R] float32: log mu of each sampled token (engine's logp_of), 0 off the mask
    truncated: Tensor  # [N] bool: no EOS id within max_new_tokens
    routes: Tensor | None = None  # [N, P+R, L, K] int8/int16, -1 = no route (when recorded)
    trajectories: list[Trajectory] | None = None  # multi-turn: per row, turns, env rewards and errors


class RolloutEngine(ABC):
    """Samples completions from the current policy weights."""

    @abstractmethod
    def bind(self, policy: nn.Module, tokenizer: Any) -> None:
        """Attach to the trainer's policy (copy or share its weights)."""

    @abstractmethod
    def generate(
        self, prompts: list[Prompt], *, n: int, greedy: bool = False, record_routes: bool = False
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
    """The trainer's own Hugging Face model in a decode loop of ours (:mod:`lit_moe_rl.rollout.decode`).

    With ``dtype: same`` the engine shares the trainer's module (no copy, nothing to sync). With another
    dtype (``bfloat16`` rollout for an fp32 trainer: the real train/inference mismatch R3 exists to fix)
    it keeps its own copy with the dtypes of ``from_pretrained(dtype=...)`` (RoPE ``inv_freq`` and the
    family's fp32 modules stay float32, :mod:`lit_moe_rl.rollout.weights`), refreshed by
    :meth:`sync_weights` after each optimizer step.

    Sampling uses exactly ``temperature``, ``top_k`` and ``top_p`` (in that order) and nothing else:
    the checkpoint's ``generation_config`` sampling fields (repetition_penalty, min_p, typical_p,
    suppress_tokens, no_repeat_ngram_size, min_new_tokens, bad_words_ids, ...) are ignored, so
    ``infer_logp`` (μ) is the distribution actually sampled from. ``logp_of`` says whether μ includes
    the top-k/top-p truncation (``sampled``, the default: the true sampling probability, what an
    importance weight π/μ needs) or not (``raw``: the tempered log-softmax, what the trainer computes;
    mismatch metrics then only see numerics). Both are equal with ``top_k=0, top_p=1``.
    Generation stops at every id of ``generation_config.eos_token_id`` (int or list) and the
    tokenizer's EOS; the response mask ends at the first of any.
    """

    def __init__(
        self,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        dtype: Literal["same", "float32", "bfloat16", "float16"] = "same",
        max_prompt_len: int | None = None,
        logp_of: Literal["sampled", "raw"] = "sampled",
        max_batch_tokens: int | None = None,
    ) -> None:
        """
        Args:
            max_new_tokens: Most tokens sampled per completion (>= 1).
            temperature: Sampling temperature (> 0); the trainer divides its logits by the same value.
            top_p: Nucleus sampling mass, in (0, 1]; 1 = off.
            top_k: Keep only the k most likely tokens when sampling (>= 0; 0 = off).
            dtype: Engine weights' dtype; ``same`` shares the trainer's module.
            max_prompt_len: Left-truncate longer prompts to this many tokens (>= 1, or None = no limit).
            logp_of: μ of the truncated distribution actually sampled (``sampled``) or of the tempered
                distribution before top-k/top-p (``raw``).
            max_batch_tokens: Token budget of the live KV cache (rows x cache length); prompts run in
                waves that fit it (:mod:`lit_moe_rl.rollout.waves`; None = one wave). Usually set as
                ``rollout.max_batch_tokens``.
        """
        _check(max_new_tokens >= 1, "max_new_tokens", "must be >= 1", max_new_tokens)
        _check(temperature > 0, "temperature", "must be > 0", temperature)
        _check(0 < top_p <= 1, "top_p", "must be in (0, 1]", top_p)
        _check(top_k >= 0, "top_k", "must be >= 0", top_k)
        _check(dtype == "same" or dtype in DTYPES, "dtype", f"must be 'same' or one of {list(DTYPES)}", dtype)
        _check(
            max_prompt_len is None or max_prompt_len >= 1,
            "max_prompt_len",
            "must be >= 1 or None",
            max_prompt_len,
        )
        _check(logp_of in ("sampled", "raw"), "logp_of", "must be 'sampled' or 'raw'", logp_of)
        _check(
            max_batch_tokens is None or max_batch_tokens >= 1,
            "max_batch_tokens",
            "must be >= 1 or None",
            max_batch_tokens,
        )
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.dtype = dtype
        self.max_prompt_len = max_prompt_len
        self.logp_of = logp_of
        self.max_batch_tokens = max_batch_tokens
        # prefills skip the experts on padding; the rollout callback sets it from model.skip_padding
        self.skip_padding = True
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    @property
    def shares_policy(self) -> bool:
        return self.dtype == "same"

    def bind(self, policy: nn.Module, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model = policy if self.shares_policy else inference_copy(policy, DTYPES[self.dtype])
        note_ignored_generation_config(self.model)

    def sync_weights(self, policy: nn.Module) -> None:
        if self.shares_policy or self.model is None:
            return
        sync_into(self.model, policy)

    def _encode(self, prompts: list[Prompt], device: torch.device) -> dict[str, Tensor]:
        """Left-padded ids of strings or chat messages, BOS as the tokenizer adds it, long prompts cut
        from the left (:func:`~lit_moe_rl.rollout.prompts.encode_prompts`)."""
        enc = encode_prompts(
            self.tokenizer, prompts, max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens,
            max_positions=getattr(getattr(self.model, "config", None), "max_position_embeddings", None),
        )  # fmt: skip
        return {k: v.to(device) for k, v in enc.items()}

    def eos_token_ids(self) -> list[int]:
        """Every id that ends a completion: ``generation_config.eos_token_id`` (int or list) and the tokenizer's."""
        return eos_token_ids(self.model, self.tokenizer)

    def generate(
        self, prompts: list[Prompt], *, n: int, greedy: bool = False, record_routes: bool = False
    ) -> Generation:
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind()")
        model = self.model
        was_training = model.training
        model.eval()
        params = SamplingParams(self.temperature, self.top_p, self.top_k, self.logp_of, greedy)
        eos = self.eos_token_ids()
        gens = []
        try:
            enc = self._encode(prompts, next(model.parameters()).device)
            for wave in wave_inputs(enc, n, self.max_new_tokens, self.max_batch_tokens):
                with torch.inference_mode(), _maybe_record(model, record_routes) as rec:
                    out = decode(
                        model, wave["input_ids"], wave["attention_mask"], n=n, max_new_tokens=self.max_new_tokens,
                        params=params, eos_token_ids=eos, pad_token_id=self.tokenizer.pad_token_id, recorder=rec,
                        skip_padding=self.skip_padding,
                    )  # fmt: skip
                gens.append(self._to_generation(wave, out, n, eos))
        finally:
            model.train(was_training)
        return concat_generations(gens, self.tokenizer.pad_token_id)

    def _to_generation(self, enc: dict[str, Tensor], out: Decoded, n: int, eos: list[int]) -> Generation:
        prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)
        response_mask, truncated = response_mask_from(out.tokens, eos)
        tokens = out.tokens.masked_fill(~response_mask, self.tokenizer.pad_token_id)
        attention_mask = torch.cat(
            [enc["attention_mask"].repeat_interleave(n, dim=0), response_mask.long()], 1
        )
        return Generation(
            input_ids=torch.cat([prompt_ids, tokens], dim=1),
            attention_mask=attention_mask,
            response_mask=response_mask,
            prompt_len=prompt_ids.shape[1],
            infer_logp=out.logp.masked_fill(~response_mask, 0.0),
            truncated=truncated,
            routes=None
            if out.routes is None
            else out.routes.clone(),  # a normal tensor, not an inference one
        )


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"rollout.engine.{name}: {rule}, got {value!r}")


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """``generation_config.eos_token_id`` (None, int or list) united with ``tokenizer.eos_token_id``."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("rollout.engine: neither the tokenizer nor generation_config defines an EOS token")
    return sorted(set(ids))


_SAMPLING_FIELDS = (
    "repetition_penalty", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "min_new_tokens",
    "min_length", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "temperature", "top_k", "top_p",
)  # fmt: skip


def note_ignored_generation_config(model: nn.Module) -> None:
    """Log (once per bind) the checkpoint's generation_config sampling fields the engine does not apply."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    set_fields = config.to_diff_dict()
    ignored = {k: set_fields[k] for k in _SAMPLING_FIELDS if set_fields.get(k) is not None}
    if ignored:
        log.info(
            "rollout.engine: ignoring the checkpoint's generation_config %s; sampling uses only the engine's "
            "temperature/top_k/top_p, so infer_logp is the distribution sampled from",
            ignored,
        )


def _maybe_record(model: nn.Module, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    from lit_moe_rl.routing.record import record_routes

    return record_routes(model)


def generate_trajectories(
    engine: HFEngine,
    prompts: list[Prompt],
    samples: list[dict],
    *,
    n: int,
    make_env: Callable[[], Environment] | EnvPool,
    limits: TurnLimits,
    greedy: bool = False,
    record_routes: bool = False,
) -> Generation:
    """``n`` multi-turn trajectories per prompt with ``engine``'s weights and sampling settings
    (:mod:`lit_moe_rl.rollout.multiturn`); ``engine.max_new_tokens`` caps each turn.

    Every trajectory gets its own environment, reset with its row; the ``n`` resets of a row must
    return the same prompt (a GRPO group shares it).
    """
    if engine.model is None:
        raise RuntimeError("generate_trajectories called before bind()")
    model, tok = engine.model, engine.tokenizer
    check_window(model.config, limits)  # before any reset; the prompt's columns are checked per wave
    trajectories, firsts = start_trajectories(prompts, samples, n, make_env, limits.env_timeout_s)
    chat = isinstance(firsts[0], list)
    encoder = ObservationEncoder(tok, chat)
    for traj, prompt in zip(trajectories, [p for p in firsts for _ in range(n)], strict=True):
        traj.conversation = encoder.start(prompt)
    reset = [t for t in trajectories if not t.reset_failed] or trajectories
    stops = tuple(getattr(reset[0].env, "stop_strings", ()) or ())
    params = SamplingParams(engine.temperature, engine.top_p, engine.top_k, engine.logp_of, greedy)
    was_training = model.training
    model.eval()
    gens = []
    try:
        enc = engine._encode(firsts, next(model.parameters()).device)
        waves = wave_inputs(enc, n, cache_columns(limits), engine.max_batch_tokens)  # holes included
        for wave in waves:
            rows = trajectories[wave["rows"].start * n : wave["rows"].stop * n]
            with torch.inference_mode(), _maybe_record(model, record_routes) as rec:
                routes, _ = decode_trajectories(
                    model, wave["input_ids"], wave["attention_mask"], rows, n=n, limits=limits, params=params,
                    eos_token_ids=engine.eos_token_ids(), pad_token_id=tok.pad_token_id, tokenizer=tok,
                    encoder=encoder, stop_strings=stops, recorder=rec, skip_padding=engine.skip_padding,
                )  # fmt: skip
            gen = trajectory_generation(wave, rows, n, tok.pad_token_id)
            gen.routes = None if routes is None else routes.clone()
            gens.append(gen)
    finally:
        model.train(was_training)
    return concat_generations(gens, tok.pad_token_id)


def wave_inputs(enc: dict[str, Tensor], n: int, added: int, budget: int | None) -> list[dict[str, Any]]:
    """``enc``'s prompts split into waves that fit ``budget`` (:func:`~lit_moe_rl.rollout.waves.plan_waves`),
    each left-padded to its own longest prompt; ``rows`` is the wave's range of prompts."""
    if budget is None:
        return [{**enc, "rows": range(enc["input_ids"].shape[0])}]
    lengths = enc["attention_mask"].sum(-1).tolist()
    waves = []
    for rows in plan_waves(lengths, n, added, budget):
        width = max(lengths[i] for i in rows)
        sl = slice(rows.start, rows.stop)
        waves.append({k: v[sl, v.shape[1] - width :] for k, v in enc.items()} | {"rows": rows})
    return waves


def start_trajectories(
    prompts: list[Prompt],
    samples: list[dict],
    n: int,
    make_env: Callable[[], Environment] | EnvPool,
    timeout_s: float,
) -> tuple[list[Trajectory], list[Prompt]]:
    """``n`` reset environments per row (in worker processes when ``make_env`` is an :class:`EnvPool`,
    else each in a thread under the per-step deadline) and each row's first prompt.

    A reset that raises or misses the deadline ends that trajectory only (``reset_failed``: it samples
    its first turn from the group's prompt, is never stepped, and scores 0); the row's own prompt
    stands in when all ``n`` resets of a row fail.
    """
    rows = [(sample, prompt) for prompt, sample in zip(prompts, samples, strict=True) for _ in range(n)]
    if isinstance(make_env, EnvPool):
        envs, answers = make_env.reset_all([s for s, _ in rows], [p for _, p in rows], timeout_s)
    else:
        envs = [make_env() for _ in rows]
        calls = [lambda e=env, r=row: e.reset(*r) for env, row in zip(envs, rows, strict=True)]
        answers = run_concurrently(calls, timeout_s)
    trajectories = [Trajectory(env=env, conversation=[]) for env in envs]
    firsts = []
    for i in range(len(prompts)):
        group = [answers[j] for j in range(i * n, (i + 1) * n)]
        starts = [value for status, value in group if status == "ok"]
        if any(start != starts[0] for start in starts):
            raise ValueError(
                "rollout.env: reset() returned different prompts for one row; a GRPO group shares it"
            )
        firsts.append(starts[0] if starts else prompts[i])
    for traj, (status, value) in zip(trajectories, answers, strict=True):
        if status != "ok":
            traj.reset_failed = True
            traj.env_timeouts += status == "timeout"
            traj.env_errors += status == "error"
            traj.errors.append(f"reset() {value or 'timed out'}")
    return trajectories, firsts


def trajectory_generation(
    enc: dict[str, Tensor], trajectories: list[Trajectory], n: int, pad_token_id: int
) -> Generation:
    """The :class:`Generation` layout of finished trajectories: prompt | turn 1 | observation 1 | turn 2 ...,
    ``response_mask`` True on sampled tokens only, attention 1 on every real token, μ 0 off the mask."""
    rows, width = len(trajectories), max(len(t.tokens) for t in trajectories)
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long)
    real = torch.zeros((rows, width), dtype=torch.bool)
    sampled = torch.zeros((rows, width), dtype=torch.bool)
    logp = torch.zeros((rows, width), dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        length = len(traj.tokens)
        tokens[i, :length] = torch.tensor(traj.tokens, dtype=torch.long)
        real[i, :length] = True
        sampled[i, :length] = torch.tensor(traj.sampled, dtype=torch.bool)
        logp[i, :length] = torch.tensor(traj.logp, dtype=torch.float64).float()
    device = enc["input_ids"].device
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)
    return Generation(
        input_ids=torch.cat([prompt_ids, tokens.to(device)], 1),
        attention_mask=torch.cat(
            [enc["attention_mask"].repeat_interleave(n, dim=0), real.long().to(device)], 1
        ),
        response_mask=sampled.to(device),
        prompt_len=prompt_ids.shape[1],
        infer_logp=logp.to(device),
        truncated=torch.tensor([t.truncated for t in trajectories], device=device),
        trajectories=trajectories,
    )
