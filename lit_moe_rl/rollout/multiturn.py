"""The multi-turn decode loop: rows pause at a stop, the environment answers, its tokens are prefilled
onto the row's KV cache, and decoding resumes. No turn re-prefills history.

Choices made here (and why):

* **Rows pause at a stop, and resume together.** A row that samples any EOS id or an environment
  stop string pauses: it samples nothing and is fed a masked column per step while the other rows
  finish their turns. When no row is sampling any more, the environments of all paused rows step at
  once (threads or worker processes, one deadline, :mod:`lit_moe_rl.rollout.env_runner`), and one
  forward feeds each of them ``[its last sampled token] + observation``, right-aligned in an
  ``[A, W]`` chunk with masked columns before, so the last column's hidden state predicts every
  row's next token. One observation prefill per round of turns, not one per row that stopped: an
  earlier version prefilled each stop at once beside the other rows' decode steps, which made every
  step as wide as the longest observation (bench/multiturn.py, 64-token observations, under load:
  28 ms per trajectory against 15 ms for this one). Masked columns are holes in the KV cache (attention never reads them); the
  output layout has none.
* **Positions** count real tokens only (the trainer's ``cumsum(mask) - 1``), so the engine's RoPE
  positions are the training forward's.
* **Routes (R3) by the forward that wrote each position's KV**: the prompt prefill, each decode step,
  each observation prefill; the sampled token that ends a turn is fed with the observation, so its
  route comes from that call. A row that ends (``done``, ``max_turns``, the token budget, a failed
  or late environment step) is fed its last token once more when routes are recorded (as the
  single-turn loop feeds its EOS), then leaves; only the last position has no route.
* **Sliding-window attention** (GPT-OSS, Mixtral configs with a window) counts cache columns, holes
  included, so a window the cache could outgrow is refused before the rollout starts
  (:func:`check_window`, against :func:`cache_columns`) rather than attending to other tokens than
  the training forward does.
* **Cache columns, holes included**: a round of turns adds at most ``max_turn_tokens`` decode columns
  and one observation chunk of ``max_env_tokens`` more, so the cache never holds more than
  :func:`cache_columns` columns; ``rollout.max_batch_tokens`` plans waves with it.
* **A failed ``reset()``** (raised, or past the per-step deadline) ends its trajectory only: the row
  samples its first turn from the group's prompt (so it is never empty), is not stepped, and ends
  with reward 0 and the error counted.
* **One host transfer per step** (the sampled tokens and their μ, together): stop strings, turn
  counts and the environment need the tokens on the host anyway.
* **Tokens in, tokens out**: what is appended is exactly what was sampled or what the observation
  encoder (:mod:`lit_moe_rl.rollout.observations`) returned; nothing is re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_moe_rl.policy import position_ids_from_mask
from lit_moe_rl.rollout.decode import _prompt_routes, _Stepper
from lit_moe_rl.rollout.env import Environment
from lit_moe_rl.rollout.env_runner import step_all
from lit_moe_rl.rollout.observations import ObservationEncoder
from lit_moe_rl.rollout.sampling import SamplingParams, raise_non_finite, sample_step_flagged

__all__ = ["Trajectory", "TurnLimits", "cache_columns", "check_window", "decode_trajectories"]


@dataclass(frozen=True)
class TurnLimits:
    """When a trajectory ends besides ``done``."""

    max_turns: int  # sampled turns
    max_total_tokens: int  # sampled + observation tokens after the prompt (the trajectory budget)
    max_turn_tokens: int  # sampled tokens of one turn; a turn that reaches it ends the trajectory (truncated)
    max_env_tokens: int  # observation tokens of one step; longer ones are cut (and counted)
    env_timeout_s: float  # per-step deadline of the environment


@dataclass
class Trajectory:
    """One row's response region, host side: tokens after the prompt and what produced them."""

    env: Environment
    conversation: list[dict[str, Any]]
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    turn_start: int = 0  # index in ``tokens`` where the current turn began
    turns: int = 0
    reward: float = 0.0
    ended: bool = False
    truncated: bool = False  # ended by the budget or the turn cap, not by the environment
    env_errors: int = 0
    env_timeouts: int = 0
    obs_cut: int = 0  # observations cut to max_env_tokens or to the remaining budget
    errors: list[str] = field(default_factory=list)
    reset_failed: bool = (
        False  # its environment's reset() raised or timed out: ends at its first stop, scored 0
    )

    def turn_tokens(self) -> list[int]:
        return self.tokens[self.turn_start :]


class _Loop:
    """State of one :func:`decode_trajectories` call."""

    def __init__(
        self,
        model: nn.Module,
        trajectories: list[Trajectory],
        limits: TurnLimits,
        params,
        text: dict,
        recorder,
        skip_padding: bool = True,
    ):
        self.step = _Stepper(model, limits.max_total_tokens, skip_padding=skip_padding)
        self.traj, self.limits, self.params, self.recorder = trajectories, limits, params, recorder
        self.encoder, self.tokenizer, self.stops = text["encoder"], text["tokenizer"], text["stop_strings"]
        self.eos, self.pad = set(text["eos_token_ids"]), text["pad_token_id"]
        self.rows: list[int] = list(range(len(trajectories)))  # output row of each batch row
        self.final: list[bool] = [False] * len(trajectories)  # fed its last token (R3); leaves next step
        self.paused: list[bool] = [False] * len(trajectories)  # stopped; waits for the others' turns to end
        self.next_pos: list[int] = []
        self.full_mask: Tensor | None = None  # [A, P + cache_columns]: mask columns written so far, then 0
        self.width = 0  # columns of ``full_mask`` in the KV cache
        self.routes: Tensor | None = None
        self.prompt_len = 0

    # ---------------------------------------------------------------- sampling
    def live(self) -> list[int]:
        """Batch rows that sample this step (neither paused at a stop, nor ended)."""
        return [
            i
            for i, row in enumerate(self.rows)
            if not (self.final[i] or self.paused[i] or self.traj[row].ended)
        ]

    def sample(self, hidden: Tensor, live: list[int]) -> None:
        """Sample the ``live`` batch rows; append each token to its trajectory; pause the rows that stopped."""
        rows_hidden = (
            hidden if len(live) == len(self.rows) else hidden[torch.tensor(live, device=hidden.device)]
        )
        token, logp, bad = sample_step_flagged(self.step.head(rows_hidden), self.params)
        host = torch.stack([token.double(), logp.double(), bad.double()]).tolist()  # the step's one read
        if any(host[2]):
            raise_non_finite(int(sum(host[2])), len(live))
        for i, tok, lp in zip(live, host[0], host[1], strict=True):
            traj = self.traj[self.rows[i]]
            traj.tokens.append(int(tok))
            traj.sampled.append(True)
            traj.logp.append(lp)
            if self._stops(traj, int(tok)):
                self.paused[i] = True
            elif len(traj.tokens) >= self.limits.max_total_tokens or len(traj.turn_tokens()) >= (
                self.limits.max_turn_tokens
            ):
                traj.ended = traj.truncated = True

    def release(self) -> dict[int, list[int]]:
        """When no row is sampling any more, step every paused row's environment at once and return
        their observation tokens (the rows resume); until then, nothing."""
        if any(
            not p and not self.final[i] and not self.traj[self.rows[i]].ended
            for i, p in enumerate(self.paused)
        ):
            return {}
        paused = [i for i, p in enumerate(self.paused) if p]
        for i in paused:
            self.paused[i] = False
        return self.step_envs(paused) if paused else {}

    def _stops(self, traj: Trajectory, token: int) -> bool:
        if token in self.eos:
            return True
        if not self.stops:
            return False
        tail = traj.turn_tokens()[-max(map(len, self.stops)) :]  # every token is >= 1 character
        return self.tokenizer.decode(tail).endswith(self.stops)

    # ------------------------------------------------------------- environment
    def step_envs(self, stopped: list[int]) -> dict[int, list[int]]:
        """Step the environments of the ``stopped`` batch rows concurrently; return their observation tokens."""
        failed = [i for i in stopped if self.traj[self.rows[i]].reset_failed]
        for i in failed:  # never reset: nothing to step; the turn is counted, the reward stays 0
            self.traj[self.rows[i]].turns += 1
            self.traj[self.rows[i]].ended = True
        stopped = [i for i in stopped if not self.traj[self.rows[i]].reset_failed]
        trajs = [self.traj[self.rows[i]] for i in stopped]
        if not trajs:
            return {}
        actions = [self.tokenizer.decode(t.turn_tokens(), skip_special_tokens=True) for t in trajs]
        results = step_all([t.env for t in trajs], actions, self.limits.env_timeout_s)
        observations = {}
        for i, traj, action, result in zip(stopped, trajs, actions, results, strict=True):
            traj.turns += 1
            traj.reward += result.reward
            traj.env_errors += result.error is not None and not result.timed_out
            traj.env_timeouts += result.timed_out
            if result.error is not None:
                traj.errors.append(result.error or "timed out")
            if result.done or result.observation is None or traj.turns >= self.limits.max_turns:
                traj.ended = True
                continue
            ids = self._observation_ids(traj, action, result.observation)
            if ids is not None:
                observations[i] = ids  # may be empty: the row just samples its next turn
        return observations

    def _observation_ids(self, traj: Trajectory, action: str, observation: Any) -> list[int] | None:
        last = traj.tokens[-1]
        stop_text = self.tokenizer.decode([last]) if last in self.eos else ""
        try:
            ids = self.encoder.encode(traj.conversation, action, stop_text, observation)
        except ValueError as err:  # a malformed observation is the environment's error: end, count, go on
            traj.env_errors += 1
            traj.errors.append(str(err))
            traj.ended = True
            return None
        room = self.limits.max_total_tokens - len(traj.tokens) - 1  # leave one token to sample
        cap = min(self.limits.max_env_tokens, room)
        if len(ids) > cap:
            traj.obs_cut += 1
            ids = ids[:cap]
        if cap < 1:  # no room for the observation and one more sampled token: the budget ends it
            traj.ended = traj.truncated = True
            return None
        traj.tokens.extend(ids)
        traj.sampled.extend([False] * len(ids))
        traj.logp.extend([0.0] * len(ids))
        traj.turn_start = len(traj.tokens)
        return ids

    # --------------------------------------------------------------- forwards
    def next_inputs(self, observations: dict[int, list[int]]) -> list[tuple[int, list[int]]]:
        """``[(batch row, tokens to feed)]`` of the rows that stay; drops the others (and their cache)."""
        keep, feeds = [], []
        for i, row in enumerate(self.rows):
            traj = self.traj[row]
            if self.final[i] or (traj.ended and self.recorder is None):
                continue
            self.final[i] = traj.ended
            keep.append(i)
            if self.paused[i]:  # waits: a masked column, its last token is fed with its observation
                feeds.append([])
                continue
            feeds.append([traj.tokens[-1 - len(observations.get(i, []))]] + observations.get(i, []))
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.full_mask.device)
            self.step.cache.batch_select_indices(index)
            self.full_mask = self.full_mask[index]
            self.rows = [self.rows[i] for i in keep]
            self.final = [self.final[i] for i in keep]
            self.paused = [self.paused[i] for i in keep]
            self.next_pos = [self.next_pos[i] for i in keep]
        return feeds

    def forward(self, feeds: list[list[int]]) -> Tensor:
        """Feed each batch row its tokens (right-aligned in an ``[A, W]`` chunk); record their routes.

        The attention mask is a view of one buffer (no per-step copy of the whole mask), and a decode
        step (``W == 1``) builds its inputs with one host-to-device tensor each, not a loop of writes.
        """
        width, device = max(map(len, feeds)), self.full_mask.device
        if width == 1:
            real = [bool(feed) for feed in feeds]
            ids = torch.tensor([[feed[0] if feed else self.pad] for feed in feeds])
            chunk_mask = torch.tensor([[int(r)] for r in real])
            positions = torch.tensor([[p if r else 0] for p, r in zip(self.next_pos, real, strict=True)])
            self.next_pos = [p + r for p, r in zip(self.next_pos, real, strict=True)]
        else:
            ids, chunk_mask, positions = self._chunk(feeds, width)
        self.full_mask[:, self.width : self.width + width] = chunk_mask.to(device)
        self.width += width
        with self.step.real_tokens(chunk_mask if width > 1 else None):  # no experts on a chunk's holes
            hidden = self.step(ids.to(device), self.full_mask[:, : self.width], positions.to(device))
        if self.recorder is not None:
            self._record(feeds, width)
        return hidden

    def _chunk(self, feeds: list[list[int]], width: int) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids, mask and positions of an ``[A, W]`` chunk, each row's feed right-aligned."""
        ids = torch.full((len(feeds), width), self.pad, dtype=torch.long)
        chunk_mask = torch.zeros((len(feeds), width), dtype=torch.long)
        positions = torch.zeros((len(feeds), width), dtype=torch.long)
        for i, feed in enumerate(feeds):
            if not feed:
                continue
            ids[i, width - len(feed) :] = torch.tensor(feed)
            chunk_mask[i, width - len(feed) :] = 1
            positions[i, width - len(feed) :] = torch.arange(self.next_pos[i], self.next_pos[i] + len(feed))
            self.next_pos[i] += len(feed)
        return ids, chunk_mask, positions

    def _record(self, feeds: list[list[int]], width: int) -> None:
        """Routes of the chunk's real columns, at their positions in the output layout."""
        taken = self.recorder.take().to(self.routes.device)  # [A, W, L, K]
        batch_idx, chunk_col, out_row, out_col = [], [], [], []
        for i, feed in enumerate(feeds):
            first = len(self.traj[self.rows[i]].tokens) - len(feed)  # response index of the first fed token
            for j in range(len(feed)):
                batch_idx.append(i)
                chunk_col.append(width - len(feed) + j)
                out_row.append(self.rows[i])
                out_col.append(self.prompt_len + first + j)
        self.routes[out_row, out_col] = taken[batch_idx, chunk_col]


def cache_columns(limits: TurnLimits) -> int:
    """Most KV-cache columns after the prompt, masked holes included: each of ``max_turns`` rounds adds
    at most ``max_turn_tokens`` columns of decode steps (the last one widened by an observation of
    ``max_env_tokens``), and a row that ends is fed its last token once more (R3)."""
    return limits.max_turns * (limits.max_turn_tokens + limits.max_env_tokens) + 1


def check_window(config: Any, limits: TurnLimits, prompt_len: int = 0) -> None:
    """Refuse a sliding window the cache could outgrow (its columns include masked holes) before any
    work: the engine would attend to other tokens than the trainer's forward does."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    columns = prompt_len + cache_columns(limits)
    if window is not None and columns > window:
        raise ValueError(
            f"rollout.env: multi-turn rollouts of a sliding-window model need sliding_window >= the KV cache's "
            f"{columns} columns (prompt + max_turns x (max_new_tokens + max_env_tokens) + 1, masked holes "
            f"included), got {window}; lower rollout.max_turns, rollout.engine.max_new_tokens or "
            f"rollout.max_env_tokens"
        )


@torch.inference_mode()
def decode_trajectories(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    trajectories: list[Trajectory],
    *,
    n: int,
    limits: TurnLimits,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    tokenizer: Any,
    encoder: ObservationEncoder,
    stop_strings: tuple[str, ...] = (),
    recorder=None,
    skip_padding: bool = True,
) -> tuple[Tensor | None, int]:
    """Run ``n`` trajectories per left-padded prompt ``[B, P]`` to their end; fills ``trajectories``
    (``B * n`` of them, prompt-major) and returns ``(routes [N, P + R, L, K] or None, P)``.
    ``skip_padding``: prefills skip the experts on padding and holes (``model.skip_padding``)."""
    host_mask = attention_mask.cpu()  # read once: the left-padding check and the prefill's real tokens
    if not bool(host_mask[:, -1].all()):
        raise ValueError("rollout.engine: prompts must be left-padded (tokenizer.padding_side='left')")
    check_window(model.config, limits, input_ids.shape[1])
    text = dict(encoder=encoder, tokenizer=tokenizer, stop_strings=stop_strings, eos_token_ids=eos_token_ids,
                pad_token_id=pad_token_id)  # fmt: skip
    loop = _Loop(model, trajectories, limits, params, text, recorder, skip_padding)
    prompt_len = loop.prompt_len = input_ids.shape[1]
    positions = position_ids_from_mask(attention_mask)
    hidden = loop.step.prefill(input_ids, attention_mask, host_mask).repeat_interleave(n, dim=0)
    if recorder is not None:
        loop.routes = _prompt_routes(recorder, attention_mask, n, prompt_len + limits.max_total_tokens)
    loop.step.cache.batch_repeat_interleave(n)
    loop.full_mask = torch.cat(
        [attention_mask, attention_mask.new_zeros((attention_mask.shape[0], cache_columns(limits)))], dim=1
    ).repeat_interleave(n, dim=0)
    loop.width = prompt_len
    loop.next_pos = (positions[:, -1] + 1).repeat_interleave(n).tolist()
    while loop.rows:
        live = loop.live()
        if live:
            loop.sample(hidden, live)
        observations = loop.release()
        feeds = loop.next_inputs(observations)
        if not feeds:
            break
        hidden = loop.forward(feeds)
    width = prompt_len + max(len(t.tokens) for t in trajectories)
    return (None if loop.routes is None else loop.routes[:, :width]), prompt_len
