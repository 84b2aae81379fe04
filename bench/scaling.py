"""How ``lit-moe-rl fit`` step time and peak memory grow with G, response length, experts and vocabulary.

    HF_HUB_OFFLINE=1 python bench/scaling.py [--steps 4] [--threads 2] [--out bench/results/scaling]
    HF_HUB_OFFLINE=1 python bench/scaling.py --smoke     # one tiny point: checks that it all runs
    HF_HUB_OFFLINE=1 python bench/scaling.py --decode-lengths 256 1024 4096 --G   # only the length axis

From a small base point (a random Qwen3-MoE, hidden 64, 2 layers, 8 experts top-2, a 99-symbol
character tokenizer; 4 prompts x G=8 completions x up to 32 new tokens, fp32) one setting at a time
grows while the others stay at the base:

* ``G`` (completions per prompt, ``--G``): 4, 8, 16;
* ``response_len`` (``rollout.engine.max_new_tokens``, ``--response-len``): 16, 32, 64 (a random model
  seldom emits EOS, so the responses are about this long; the tokens per completion are recorded);
* ``experts`` (routed experts, top-2 each, ``--experts``): 4, 8, 16;
* ``vocab`` (vocabulary size; the tokenizer has as many symbols, ``--vocab``): 99, 16384, 151936
  (Qwen3's).

and, in this process, the engine's **time per token against response length** (``--decode-lengths``,
to 4k tokens): one decode of a tiny Qwen3-MoE with EOS off, timed over the last quarter before each
length (:func:`bench.decode_length.time_per_token`), so the ratios between lengths come from one run
under one load. What grows is attention over the longer cache; the loop itself copies nothing that
grows with the length (doubling KV cache, the attention mask a view of one buffer).

Each point is one ``lit-moe-rl fit`` subprocess with ``--threads`` intra-op threads. Step time is the
median over steps 2..N of the wall time between optimizer-step ends; peak memory is the highest resident
memory during training minus the resident memory when training starts (model loaded): what the steps
add (activations, KV cache, logits, optimizer state). Writes ``<out>.json`` and ``<out>.png``. CPU numbers
from a shared machine are noisy: compare points from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.* and lit_moe_rl from this checkout

from bench.steptimer import run_timed, timed_fit_command  # noqa: E402

BASE = {"G": 8, "response_len": 32, "experts": 8, "vocab": 99}
AXES = {"G": [4, 8, 16], "response_len": [16, 32, 64], "experts": [4, 8, 16], "vocab": [99, 16384, 151936]}
SMOKE_AXES = {"G": [2], "response_len": [4], "experts": [4], "vocab": [99]}
DECODE_LENGTHS, SMOKE_DECODE_LENGTHS = [256, 1024, 4096], [16, 32]
DECODE_ROWS = 8
LABELS = {
    "G": "completions per prompt G",
    "response_len": "max new tokens",
    "experts": "routed experts (top-2)",
    "vocab": "vocabulary size",
}
PROMPTS_PER_STEP = 4


def alphabet(vocab: int) -> str:
    """``vocab - 4`` distinct characters (4 specials come first): printable ASCII, then further code points."""
    chars = string.digits + string.ascii_letters + string.punctuation + " "
    code = 0xA1
    while len(chars) < vocab - 4:
        if not 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
            chars += chr(code)
        code += 1
    return chars[: vocab - 4]


def save_tokenizer(vocab: int, folder: Path) -> Path:
    """A character tokenizer with exactly ``vocab`` tokens, saved at ``folder`` (once)."""
    from lit_moe_rl.policy import char_tokenizer

    if not (folder / "tokenizer.json").is_file():
        tok = char_tokenizer(alphabet(vocab))
        assert len(tok) == vocab, (len(tok), vocab)
        tok.save_pretrained(folder)
    return folder


def write_prompts(path: Path, n: int = 64) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i % 17} + {3 * i % 23}? Answer:"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_command(point: dict[str, int], steps: int, tokenizer: Path, prompts: Path, out: Path) -> list[str]:
    """``lit-moe-rl fit`` at one point (this interpreter, so the checkout's code)."""
    config = {
        "family": "qwen3_moe",
        "vocab_size": point["vocab"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_experts": point["experts"],
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "max_position_embeddings": 512,
    }
    return [
        *timed_fit_command(
            steps, out, prompts=prompts, batch_size=PROMPTS_PER_STEP, group_size=point["G"],
            max_new_tokens=point["response_len"],
        ),
        "--trainer.logger=false",
        f"--model.config={json.dumps(config)}",
        f"--model.tokenizer={tokenizer}",
        "--model.lr=1e-6",
    ]  # fmt: skip


def measure(point: dict[str, int], steps: int, threads: int, work: Path) -> dict[str, Any]:
    """Run one point; its median s/step over steps 2..N, peak memory the steps add, and tokens per completion."""
    tokenizer = save_tokenizer(point["vocab"], work / f"tok-{point['vocab']}")
    out = work / f"point-{time.monotonic_ns()}.json"
    command = fit_command(point, steps, tokenizer, work / "prompts.jsonl", out)
    command.append(f"--trainer.default_root_dir={work / out.stem}")  # where the CLI saves config.yaml
    result = run_timed(command, work, out, threads, f"point {point}")
    step_s = result["step_s"]
    return {
        **point,
        "s_per_step": statistics.median(step_s),
        "step_s": step_s,
        "peak_mib": (result["peak_rss_kib"] - result["rss_start_kib"]) / 1024,
        "rss_start_mib": result["rss_start_kib"] / 1024,
        "tokens_per_completion": statistics.mean(result["lengths"]),
    }


def sweep(
    axes: dict[str, list[int]], base: dict[str, int], steps: int, threads: int, work: Path
) -> list[dict]:
    """Every point of every axis (the base point is measured once and shared)."""
    write_prompts(work / "prompts.jsonl")
    cache: dict[tuple, dict[str, Any]] = {}
    rows = []
    for axis, values in axes.items():
        for value in values:
            point = {**base, axis: value}
            key = tuple(sorted(point.items()))
            if key not in cache:
                cache[key] = measure(point, steps, threads, work)
                r = cache[key]
                print(
                    f"  {axis}={value:<7} s/step={r['s_per_step']:.3f}  peak +{r['peak_mib']:.0f} MiB  "
                    f"tokens/completion {r['tokens_per_completion']:.1f}",
                    flush=True,
                )
            rows.append({"axis": axis, "value": value, **cache[key]})
    return rows


def decode_lengths(lengths: list[int], threads: int) -> list[dict[str, float]]:
    """ms per token at each response length, in this process (one decode; ratios from one run)."""
    import torch

    from bench.decode_length import time_per_token, tiny_model

    torch.set_num_threads(threads)
    model, tok = tiny_model(max(lengths))
    rows = time_per_token(model, tok, lengths, DECODE_ROWS)
    print(f"response length   ms/token ({DECODE_ROWS} rows, one run)   x shortest")
    for r in rows:
        print(f"{r['length']:>15}   {r['ms_per_token']:>27.3f}   {r['vs_shortest']:>10.2f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """One panel per axis: s/step (left) and peak memory added (right) against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(dict.fromkeys(r["axis"] for r in rows))
    cols = min(len(axes), 2)
    rows_n = -(-len(axes) // cols)
    fig, panels = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, axis in zip(panels.flat, axes, strict=False):
        pts = [r for r in rows if r["axis"] == axis]
        xs = [r["value"] for r in pts]
        ax.plot(xs, [r["s_per_step"] for r in pts], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(LABELS[axis])
        ax.set_ylabel("s / step", color="tab:blue")
        mem = ax.twinx()
        mem.plot(xs, [r["peak_mib"] for r in pts], "s--", color="tab:red")
        mem.set_ylabel("peak memory added (MiB)", color="tab:red")
    fig.suptitle("lit-moe-rl fit: step time and peak memory (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per point (median over 2..N)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    for axis, values in AXES.items():
        flag = "--" + axis.replace("_", "-")
        parser.add_argument(
            flag, dest=axis, type=int, nargs="*", default=values, help=f"{LABELS[axis]} values (none: skip)"
        )
    parser.add_argument(
        "--decode-lengths", type=int, nargs="*", default=DECODE_LENGTHS,
        help="response lengths for the engine's time per token (none: skip)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "scaling", help="<out>.json/png"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny point, 2 steps: checks that it all runs"
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps: must be >= 2 (step 1 is dropped), got {args.steps}")
    if args.smoke:
        args.steps = 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    axes = SMOKE_AXES if args.smoke else {axis: getattr(args, axis) for axis in AXES if getattr(args, axis)}
    base = {k: v[0] for k, v in SMOKE_AXES.items()} if args.smoke else BASE
    lengths = SMOKE_DECODE_LENGTHS if args.smoke else args.decode_lengths
    per_token = decode_lengths(lengths, args.threads) if lengths else []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        rows = sweep(axes, base, args.steps, args.threads, Path(tmp))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "threads": args.threads,
        "steps": args.steps,
        "base": base,
        "points": rows,
        "decode_lengths": per_token,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if rows:
        plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}" + (f" and {args.out.with_suffix('.png')}" if rows else ""))
    return result


if __name__ == "__main__":
    main()
