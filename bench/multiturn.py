"""Multi-turn cost: the engine's KV cache kept across turns against a loop that re-prefills the history.

    HF_HUB_OFFLINE=1 python bench/multiturn.py [--rows 16] [--turns 4] [--obs 16] [--repeats 3]

On 4-turn trajectories of a tiny random Qwen3-MoE (plain-text environment, an observation of
``--obs`` tokens after each turn but the last), it measures per trajectory:

* **engine**: :func:`~lit_moe_rl.rollout.engine.generate_trajectories`, which prefills only each
  observation onto the row's cache;
* **re-prefill**: the loop other frameworks run, teacher-forced on the *same* trajectories so both
  process identical tokens: every turn prefills the whole history (prompt, earlier turns and
  observations) into a fresh cache, then feeds that turn's sampled tokens one step at a time. Each
  forward also computes the LM head and samples a (discarded) token, as a real loop must; without it
  the baseline skipped work the engine does (``--no-sample`` times that leaner loop).

Prefilled tokens are counted by a hook on the decoder (real tokens of each row fed in a call that
feeds that row more than one token); decode tokens are rows fed one token. Wall and CPU times (this
process, all its threads: other jobs on a shared machine do not count) are medians of ``--repeats``,
per trajectory, with torch pinned to ``--threads`` threads. On a shared machine, wall-time ratios
swing with the load (0.8-1.3x between runs); CPU-time ratios are steadier. The token counts are exact.
Prints numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import DynamicCache

from lit_moe_rl.policy import cache_kwarg, load_policy, position_ids_from_mask
from lit_moe_rl.rollout.engine import Generation, HFEngine, generate_trajectories
from lit_moe_rl.rollout.env import Environment
from lit_moe_rl.rollout.multiturn import TurnLimits
from lit_moe_rl.rollout.sampling import SamplingParams, sample_step_flagged

OBSERVATION = "= 12 => 34 ="


class FixedTurns(Environment):
    """``turns`` turns, each answered with the same text; turns end at '=' or '>' (frequent characters)."""

    stop_strings = ("=", ">")

    def __init__(self, turns: int, obs_tokens: int) -> None:
        self.turns, self.text = turns, (OBSERVATION * obs_tokens)[:obs_tokens]

    def reset(self, sample: dict, prompt: Any) -> Any:
        self.done = 0
        return prompt

    def step(self, action: str) -> tuple[str | None, float, bool]:
        self.done += 1
        return (None if self.done >= self.turns else self.text), 0.0, self.done >= self.turns


class Counter:
    """Real tokens fed to the decoder: prefilled (a row fed > 1 token in a call) and decoded (1 token)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.prefill = self.decode = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, _args, kwargs) -> None:
        width = kwargs["input_ids"].shape[1]
        per_row = kwargs["attention_mask"][:, -width:].sum(1)
        self.prefill += int(per_row[per_row > 1].sum())
        self.decode += int((per_row == 1).sum())


@torch.inference_mode()
def reprefill(model: torch.nn.Module, gen: Generation, sample: bool = True) -> None:
    """Teacher-forced re-prefill loop over ``gen``'s trajectories: each turn prefills the history."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()

    def forward(**kwargs) -> None:
        hidden = decoder(**kwargs).last_hidden_state[:, -1]
        if sample:  # the next token's logits and a draw, as the engine computes at every step
            sample_step_flagged(head(hidden), SamplingParams())

    kw = cache_kwarg(decoder)
    response = gen.input_ids[:, gen.prompt_len :]
    sampled = gen.response_mask
    real = gen.attention_mask.bool()
    turns = _turn_spans(sampled, real[:, gen.prompt_len :])
    for k in range(max(map(len, turns))):
        rows = [i for i, spans in enumerate(turns) if k < len(spans)]
        histories = [
            gen.input_ids[i, : gen.prompt_len + turns[i][k][0]][real[i, : gen.prompt_len + turns[i][k][0]]]
            for i in rows
        ]
        width = max(map(len, histories))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, h in enumerate(histories):
            ids[j, width - len(h) :], mask[j, width - len(h) :] = h, 1
        cache = DynamicCache(config=model.config)
        forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            **{kw: cache},
        )
        steps = max(turns[i][k][1] - turns[i][k][0] for i in rows)
        pos = mask.sum(1, keepdim=True)
        for t in range(steps - 1):  # the turn's tokens but its last are fed (the last ends the turn)
            col = torch.tensor([min(turns[i][k][0] + t, turns[i][k][1] - 1) for i in rows])
            token = response[torch.tensor(rows), col][:, None]
            live = torch.tensor([[t < turns[i][k][1] - turns[i][k][0] - 1] for i in rows]).long()
            mask = torch.cat([mask, live], 1)
            forward(input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
            pos = pos + live


def _turn_spans(sampled: torch.Tensor, real: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, ``[(start, end)]`` response columns of each sampled turn."""
    out = []
    for row in range(sampled.shape[0]):
        spans, start = [], None
        values = (sampled[row] & real[row]).tolist()
        for j, v in enumerate(values + [False]):
            if v and start is None:
                start = j
            elif not v and start is not None:
                spans.append((start, j))
                start = None
        out.append(spans)
    return out


def measure(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_policy(
        config={"family": "qwen3_moe", "vocab_size": 24, "max_position_embeddings": 1024}
    )
    model.eval()
    engine = HFEngine(max_new_tokens=args.turn_tokens)
    engine.bind(model, tok)
    limits = TurnLimits(
        args.turns, args.turns * (args.turn_tokens + args.obs), args.turn_tokens, args.obs, 10.0
    )
    prompts = ["3 5 7 => 22 ="] * args.rows
    times: dict[str, list[float]] = {"engine": [], "reprefill": [], "engine_cpu": [], "reprefill_cpu": []}
    counts: dict[str, Counter] = {}
    for _ in range(args.repeats):
        counter = Counter(model)
        torch.manual_seed(1)
        start, cpu = time.perf_counter(), time.process_time()
        gen = generate_trajectories(
            engine,
            prompts,
            [{}] * args.rows,
            n=1,
            make_env=lambda: FixedTurns(args.turns, args.obs),
            limits=limits,
        )
        times["engine"].append((time.perf_counter() - start) / args.rows)
        times["engine_cpu"].append((time.process_time() - cpu) / args.rows)
        counter.handle.remove()
        counts["engine"] = counter
        counter = Counter(model)
        start, cpu = time.perf_counter(), time.process_time()
        reprefill(model, gen, sample=not args.no_sample)
        times["reprefill"].append((time.perf_counter() - start) / args.rows)
        times["reprefill_cpu"].append((time.process_time() - cpu) / args.rows)
        counter.handle.remove()
        counts["reprefill"] = counter
    turns = sum(t.turns for t in gen.trajectories) / args.rows
    out = {"turns_per_trajectory": turns}
    for name in ("engine", "reprefill"):
        out[f"{name}_prefill_tokens"] = counts[name].prefill / args.rows
        out[f"{name}_decode_tokens"] = counts[name].decode / args.rows
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_cpu_s"] = statistics.median(times[name + "_cpu"])
    out["prefill_ratio"] = out["reprefill_prefill_tokens"] / max(out["engine_prefill_tokens"], 1.0)
    out["time_ratio"] = out["reprefill_s"] / out["engine_s"]
    out["cpu_ratio"] = out["reprefill_cpu_s"] / out["engine_cpu_s"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="trajectories")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--obs", type=int, default=16, help="observation tokens after each turn")
    parser.add_argument("--turn_tokens", type=int, default=32, help="most sampled tokens per turn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-sample", action="store_true", help="re-prefill loop without LM head and sampling"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    out = measure(parse_args(argv))
    print("per trajectory        engine (KV kept)   re-prefill each turn")
    for name, key in (
        ("prefilled tokens", "prefill_tokens"),
        ("decoded tokens", "decode_tokens"),
        ("wall time (s)", "s"),
        ("CPU time (s)", "cpu_s"),
    ):
        print(f"{name:<20} {out['engine_' + key]:>16.4g} {out['reprefill_' + key]:>22.4g}")
    print(f"turns per trajectory {out['turns_per_trajectory']:.2f}; prefill ratio {out['prefill_ratio']:.2f}x, "
          f"time ratio {out['time_ratio']:.2f}x, CPU-time ratio {out['cpu_ratio']:.2f}x (re-prefill / engine)")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
