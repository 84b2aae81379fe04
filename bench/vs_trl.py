"""Step throughput of ``lit-moe-rl fit`` against TRL's ``GRPOTrainer`` on one shared workload, split into
generation and update, at each trainer's defaults, at equal threads, and at a real vocabulary.

    pip install -e ".[bench]"        # TRL (never a core dependency)
    HF_HUB_OFFLINE=1 python bench/vs_trl.py [--rows defaults,threads2,threads1,vocab] [--steps 8] [--repeats 2]
    HF_HUB_OFFLINE=1 python bench/vs_trl.py --quick      # 2 steps of tiny rows: checks that it all runs

The workload is built as a local Hugging Face folder that both trainers load: a random Qwen3-MoE
(hidden 256, 4 layers, 8 experts top-2, expert width 256, 4 heads / 2 KV heads) with a character
tokenizer (:func:`lit_moe_rl.policy.char_tokenizer`), fp32, and 64 short arithmetic prompts. One step
= 4 prompts x 8 completions x up to 64 new tokens, one optimizer update. The rows (``--rows``):

* ``defaults``: each trainer as a user runs it: no ``OMP_NUM_THREADS``, so lit-moe-rl picks its own
  count (``--num_threads 0``, README "Threads"; ``LIT_MOE_RL_AUTO_THREADS=<rule>`` times another rule,
  named in the row) and TRL uses torch's default (one thread per core);
* ``threads2`` / ``threads1``: both at 2 / 1 intra-op threads (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``);
* ``vocab``: the real-vocabulary workload at 2 threads: vocab_size 151,936 (Qwen3's), a character
  tokenizer whose 151,936 ids are all characters (ASCII, then every non-space code point from U+00A1
  on, no surrogates), up to 128 new tokens (random weights rarely sample EOS: nearly every completion is 128 tokens).

Each trainer runs as its own subprocess; lit-moe-rl, TRL with its defaults (gradient checkpointing on)
and TRL with gradient checkpointing off alternate ``repeats`` times so that load from other processes
hits them alike (``--trl`` keeps one TRL variant). A step's time is the wall time between two
consecutive optimizer-step ends (generation, reward, update, logging: everything); the figure is the
median over steps 2..N of all repeats. The split, measured the same way in both: *gen* is the rollout
(sampling, reward, advantages: lit-moe-rl's ``perf/rollout_s``, TRL's ``_generate_and_score_completions``,
timed around the call), *update* is the rest of the step (the training forward and backward, the optimizer,
logging): the median step minus the median rollout. The faster TRL variant counts for the ratio
(``TRL s/step / lit s/step``, > 1 means lit-moe-rl is faster). Time it on an idle machine: on a loaded
one the rows with 2 threads are slow and uneven (README "Threads").

Settings matched (each trainer's name for it):

* model, tokenizer, prompts: the same folder and JSONL; fp32 (``bf16=False``: TRL defaults to bf16);
  prompts encoded without special tokens in both (this tokenizer adds none);
* group: 8 completions per prompt (``num_generations`` / ``rollout.group_size``), 4 prompts per step
  (``per_device_train_batch_size=32`` completions / ``data.batch_size=4``), the whole rollout in one
  forward (``micro_batch_size=32``), one update per rollout (``num_iterations=1``,
  ``steps_per_generation=1`` / ``mini_batches=1``);
* sampling: temperature 1.0, top_p 1.0, top_k 0 (off), no min_p / repetition penalty, up to 64 new
  tokens (``vocab``: 128; ``max_completion_length`` / ``rollout.engine.max_new_tokens``), EOS id 2 in both;
* objective: token-level PPO clip 0.2 both sides (TRL ``loss_type=dapo``, ``epsilon=0.2`` / GRPO
  ``agg=token-mean``, ``clip_low=clip_high=0.2``), group-std-normalised advantages
  (``scale_rewards=group`` / ``norm_adv_by_std``), no KL and no reference model (TRL ``beta=0.0``, its
  default / ``kl_coef=0``), no entropy bonus, no router load-balancing loss (TRL would take the
  config's 0.001 and return router logits from every training forward: ``router_aux_loss_coef=0.0`` /
  ``model.router_aux_loss_coef=0``, lit-moe-rl's default);
* optimizer: AdamW, lr 1e-6 (both defaults), betas (0.9, 0.999), no weight decay, grad-norm clip 1.0.
  both use torch's fused AdamW kernel; TRL decays the lr linearly, lit-moe-rl keeps it constant: no cost difference;
* reward: :func:`digit_reward` (the share of digits in the completion), called by both;
* no evaluation, no checkpoints, metrics logged every step by both (CSV / TRL's in-memory log).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.* and lit_moe_rl from this checkout

from bench.steptimer import run_timed, timed_fit_command  # noqa: E402

ALPHABET = string.digits + string.ascii_letters + string.punctuation + " "  # 95 + 4 specials = 99 symbols
SPECIALS = 4  # <pad>, <bos>, <eos>, <unk> (lit_moe_rl.policy.char_tokenizer)
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)
PROMPTS_PER_STEP, GROUP, LR = 4, 8, 1e-6
REAL_VOCAB = 151_936  # Qwen3's vocab_size
TRL_VARIANTS = {"defaults": "TRL (defaults)", "no-gc": "TRL (no grad ckpt)"}


@dataclass(frozen=True)
class Row:
    """One row of the table: threads of both trainers (None: each trainer's own default), vocabulary
    size and new tokens of the workload."""

    label: str
    threads: int | None
    vocab: int
    new_tokens: int


ROWS = {
    "defaults": Row(
        "defaults (lit: --num_threads 0 auto, TRL: torch's default)", None, len(ALPHABET) + SPECIALS, 64
    ),
    "threads2": Row("both 2 threads", 2, len(ALPHABET) + SPECIALS, 64),
    "threads1": Row("both 1 thread", 1, len(ALPHABET) + SPECIALS, 64),
    "vocab": Row(f"vocab {REAL_VOCAB:,}, 128 new tokens, 2 threads", 2, REAL_VOCAB, 128),
}
QUICK_NEW_TOKENS, QUICK_VOCAB = 8, 4096  # --quick: every row this short, the vocab row at this vocabulary


def digit_reward(completion: str, sample: dict | None = None) -> float:
    """The share of digits among the completion's characters (0 for an empty completion)."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def trl_digit_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """:func:`digit_reward` in TRL's reward-function signature."""
    return [digit_reward(c) for c in completions]


def alphabet(vocab: int) -> str:
    """``vocab - 4`` distinct characters: :data:`ALPHABET` (the prompts' characters), then every code point
    from U+00A1 on that is neither a surrogate nor whitespace (one token each)."""
    chars, cp = list(ALPHABET), 0xA1
    while len(chars) < vocab - SPECIALS:
        ch = chr(cp)
        if not (0xD800 <= cp <= 0xDFFF or ch.isspace()):
            chars.append(ch)
        cp += 1
    return "".join(chars[: vocab - SPECIALS])


def build_workload(folder: Path, vocab: int = len(ALPHABET) + SPECIALS, num_prompts: int = 64) -> Path:
    """Save the random Qwen3-MoE (``vocab_size=vocab``), its char tokenizer with ``vocab`` ids and
    ``prompts.jsonl`` under ``folder``."""
    import torch
    import transformers

    from lit_moe_rl.policy import char_tokenizer
    from lit_moe_rl.tiny import tiny_moe_config

    tok = char_tokenizer(alphabet(vocab))
    assert len(tok) == vocab, (len(tok), vocab)
    config = tiny_moe_config("qwen3_moe", vocab_size=vocab, **MODEL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"prompt": f"Question {i}: what is {i % 17} + {3 * i % 23}? Answer:"} for i in range(num_prompts)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lit_command(folder: Path, steps: int, out: Path, logs: Path, new_tokens: int) -> list[str]:
    """``lit-moe-rl fit`` on the workload (the module run with this interpreter, so the checkout's code);
    ``--num_threads`` stays at its default (0, auto), which reads ``OMP_NUM_THREADS`` when set."""
    return [
        *timed_fit_command(
            steps, out, prompts=folder / "prompts.jsonl", batch_size=PROMPTS_PER_STEP, group_size=GROUP,
            max_new_tokens=new_tokens,
        ),
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logs}",
        f"--model.pretrained={folder}",
        "--model.dtype=float32",
        f"--model.lr={LR}",
        "--model.mini_batches=1",
        "--rollout.engine.temperature=1.0",
        "--rollout.engine.top_p=1.0",
        "--rollout.engine.top_k=0",
    ]  # fmt: skip


def trl_worker(
    folder: Path, steps: int, out: Path, gradient_checkpointing: bool | None, new_tokens: int
) -> None:
    """Train with TRL's GRPOTrainer (in this process) and write to ``out`` the step-end times and the
    seconds of each step's ``_generate_and_score_completions`` (sampling, reward, advantages)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []
    rollout_s: list[float] = []
    lengths: list[float] = []
    logged: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                logged.append(logs)

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation phase is timed (TRL calls it from ``training_step``'s
        ``_prepare_inputs``, once per step here: ``steps_per_generation=1``, ``num_iterations=1``)."""

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            rollout_s.append(time.perf_counter() - t0)
            return result

    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    config = GRPOConfig(
        output_dir=str(out.parent / f"trl-{out.stem}"),
        use_cpu=True,
        bf16=False,
        model_init_kwargs={"dtype": torch.float32},
        learning_rate=LR,
        num_generations=GROUP,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        router_aux_loss_coef=0.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = TimedGRPOTrainer(
        model=str(folder),
        reward_funcs=trl_digit_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        callbacks=[Timer()],
    )
    assert trainer.model.dtype == torch.float32, trainer.model.dtype
    trainer.train()
    out.write_text(json.dumps({"ends": ends, "rollout_s": rollout_s, "lengths": lengths, "logs": logged}))


def run(
    name: str, folder: Path, steps: int, threads: int | None, new_tokens: int, work: Path
) -> dict[str, list]:
    """One subprocess run of trainer ``name``: ``{"step_s", "gen_s", "lengths"}`` of steps 2..N
    (``gen_s[i]``: the rollout seconds inside ``step_s[i]``)."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = work / f"{slug}-{time.monotonic_ns()}.json"
    if name == "lit-moe-rl":
        command = lit_command(folder, steps, out, work / "lit-logs", new_tokens)
    else:
        gc = {"TRL (defaults)": None, "TRL (no grad ckpt)": False}[name]
        payload = json.dumps([str(folder), steps, str(out), gc, new_tokens])
        command = [sys.executable, __file__, "--worker", payload]
    result = run_timed(command, work, out, threads, name)
    gen = result.get("rollout_s", [])
    if len(gen) != len(result["ends"]):
        sys.exit(f"{name}: {len(gen)} rollout timings for {len(result['ends'])} steps")
    return {"step_s": result["step_s"], "gen_s": gen[1:], "lengths": result["lengths"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated rows to run, of {', '.join(ROWS)}"
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (median over 2..N)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each trainer")
    parser.add_argument(
        "--trl",
        default="both",
        choices=["both", *TRL_VARIANTS],
        help="TRL variants: gradient checkpointing on, off",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"2 steps, 1 repeat, {QUICK_NEW_TOKENS} new tokens, vocab row at {QUICK_VOCAB}: checks that it all runs",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models, logs and timings here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not args.rows:
        parser.error(
            f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}"
        )
    if args.quick:
        args.steps, args.repeats = 2, 1
    if args.steps < 2:
        parser.error(f"--steps: must be >= 2 (step 1 is dropped), got {args.steps}")
    return args


def row_workload(name: str, quick: bool) -> Row:
    """The row ``name``; with ``--quick`` at :data:`QUICK_NEW_TOKENS` new tokens and at most :data:`QUICK_VOCAB` ids."""
    row = ROWS[name]
    rule = os.environ.get("LIT_MOE_RL_AUTO_THREADS")  # lit_moe_rl/cli/threads.py: the auto rule, when chosen
    if row.threads is None and rule:
        row = Row(
            row.label.replace("--num_threads 0 auto", f"--num_threads 0 auto, rule {rule}"), *astuple(row)[1:]
        )
    if not quick:
        return row
    vocab = min(row.vocab, QUICK_VOCAB)
    label = row.label.replace(f"{REAL_VOCAB:,}", f"{vocab:,}").replace("128 new", f"{QUICK_NEW_TOKENS} new")
    return Row(label + " [quick]", row.threads, vocab, QUICK_NEW_TOKENS)


def run_row(row: Row, args: argparse.Namespace, work: Path, names: list[str]) -> dict[str, dict[str, list]]:
    """Every trainer of ``names`` on ``row``, alternating ``args.repeats`` times; results by trainer."""
    folder = work / f"model-v{row.vocab}"
    if not folder.is_dir():
        build_workload(folder, row.vocab)
    results: dict[str, dict[str, list]] = {n: {"step_s": [], "gen_s": [], "lengths": []} for n in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for key, values in run(name, folder, args.steps, row.threads, row.new_tokens, work).items():
                results[name][key] += values
            print(
                f"  [{row.label}] ran {name} ({args.steps} steps) in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        folder, steps, out, gc, new_tokens = json.loads(args.worker)
        trl_worker(Path(folder), steps, Path(out), gc, new_tokens)
        return
    variants = list(TRL_VARIANTS) if args.trl == "both" else [args.trl]
    names = ["lit-moe-rl", *(TRL_VARIANTS[v] for v in variants)]
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        table = []
        for name in args.rows:
            row = row_workload(name, args.quick)
            results = run_row(row, args, work, names)
            report_row(row, results)
            table.append((row, results))
    print()
    report_table(table, args)


def split(result: dict[str, list]) -> tuple[float, float, float]:
    """``(s/step, gen, update)``: the medians over the steps of the step and of its rollout, and the rest
    (``update = s/step - gen``, so that the two parts add up to the step)."""
    step, gen = statistics.median(result["step_s"]), statistics.median(result["gen_s"])
    return step, gen, step - gen


def report_row(row: Row, results: dict[str, dict[str, list]]) -> None:
    """Each trainer's s/step, its gen + update split, completion length and sampled tokens/s."""
    print(
        f"{row.label}: {PROMPTS_PER_STEP} prompts x {GROUP} completions x <= {row.new_tokens} tokens, vocab {row.vocab:,}"
    )
    for name, result in results.items():
        step, gen, upd = split(result)
        length = statistics.mean(result["lengths"]) if result["lengths"] else float("nan")
        tokens_per_s = PROMPTS_PER_STEP * GROUP * length / step
        print(
            f"  {name:<20} s/step={step:.3f} (gen {gen:.3f} + update {upd:.3f})  "
            f"tokens per completion {length:.1f}, ~{tokens_per_s:.0f} tokens/s"
        )


def report_table(table: list[tuple[Row, dict[str, dict[str, list]]]], args: argparse.Namespace) -> None:
    """One line per row: lit s/step (gen + update), the faster TRL variant's, ``ratio`` = TRL / lit s/step."""
    print(f"median over steps 2..{args.steps} of {args.repeats} run(s) each; ratio > 1: lit-moe-rl is faster")
    print("| row | lit-moe-rl s/step (gen + update) | TRL s/step (gen + update) | ratio |")
    print("|---|---|---|---|")
    for row, results in table:
        lit = split(results["lit-moe-rl"])
        trl_name = min((n for n in results if n != "lit-moe-rl"), key=lambda n: split(results[n])[0])
        trl = split(results[trl_name])
        print(
            f"| {row.label} | {lit[0]:.2f} ({lit[1]:.2f} + {lit[2]:.2f}) | "
            f"{trl[0]:.2f} ({trl[1]:.2f} + {trl[2]:.2f}) {trl_name.removeprefix('TRL ')} | ratio={trl[0] / lit[0]:.2f} |"
        )


if __name__ == "__main__":
    main()
