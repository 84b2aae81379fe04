"""Step throughput of ``lit-moe-rl fit`` against TRL's ``GRPOTrainer`` on one shared workload.

    pip install -e ".[bench]"        # TRL (never a core dependency)
    HF_HUB_OFFLINE=1 python bench/vs_trl.py [--steps 8] [--repeats 2] [--threads 2] [--quick]

The workload is built once as a local Hugging Face folder that both trainers load: a random Qwen3-MoE
(hidden 256, 4 layers, 8 experts top-2, expert width 256, 4 heads / 2 KV heads) with a character
tokenizer of 99 symbols (:func:`lit_moe_rl.policy.char_tokenizer` over printable ASCII), fp32, and 64
short arithmetic prompts. One step = 4 prompts x 8 completions x up to 64 new tokens, one optimizer
update. Each trainer runs as its own subprocess with ``--threads`` intra-op threads (OMP/MKL); the
three runs -- lit-moe-rl, TRL with its defaults (gradient checkpointing on), TRL with gradient
checkpointing off -- alternate ``repeats`` times so that load from other processes hits them alike.
A step's time is the wall time between two consecutive optimizer-step ends (generation, reward,
update, logging: everything); the figure is the median over steps 2..N of all repeats. The faster
TRL variant counts for the ratio (``TRL s/step / lit s/step``, > 1 means lit-moe-rl is faster).
On a machine that other jobs share, pass ``--threads 1``: OpenMP threads that spin while other
processes hold the cores make a 2-thread step several times slower, and unevenly so.

Settings matched (each trainer's name for it):

* model, tokenizer, prompts: the same folder and JSONL; fp32 (``bf16=False``: TRL defaults to bf16);
  prompts encoded without special tokens in both (this tokenizer adds none);
* group: 8 completions per prompt (``num_generations`` / ``rollout.group_size``), 4 prompts per step
  (``per_device_train_batch_size=32`` completions / ``data.batch_size=4``), the whole rollout in one
  forward (``micro_batch_size=32``), one update per rollout (``num_iterations=1``,
  ``steps_per_generation=1`` / ``mini_batches=1``);
* sampling: temperature 1.0, top_p 1.0, top_k 0 (off), no min_p / repetition penalty, up to 64 new
  tokens (``max_completion_length`` / ``rollout.engine.max_new_tokens``), EOS id 2 in both;
* objective: token-level PPO clip 0.2 both sides (TRL ``loss_type=dapo``, ``epsilon=0.2`` / GRPO
  ``agg=token-mean``, ``clip_low=clip_high=0.2``), group-std-normalised advantages
  (``scale_rewards=group`` / ``norm_adv_by_std``), no KL and no reference model (TRL ``beta=0.0``, its
  default / ``kl_coef=0``), no entropy bonus, no router load-balancing loss (TRL would take the
  config's 0.001 and return router logits from every training forward: ``router_aux_loss_coef=0.0`` /
  ``model.router_aux_loss_coef=0``, lit-moe-rl's default);
* optimizer: AdamW, lr 1e-6 (both defaults), betas (0.9, 0.999), no weight decay, grad-norm clip 1.0.
  TRL decays the lr linearly and uses the fused AdamW, lit-moe-rl keeps it constant: no cost difference;
* reward: :func:`digit_reward` (the share of digits in the completion), called by both;
* no evaluation, no checkpoints, metrics logged every step by both (CSV / TRL's in-memory log).
"""

from __future__ import annotations

import argparse
import json
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

ALPHABET = string.digits + string.ascii_letters + string.punctuation + " "  # 95 + 4 specials = 99 symbols
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
PROMPTS_PER_STEP, GROUP, MAX_NEW_TOKENS, LR = 4, 8, 64, 1e-6


def digit_reward(completion: str, sample: dict | None = None) -> float:
    """The share of digits among the completion's characters (0 for an empty completion)."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def trl_digit_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """:func:`digit_reward` in TRL's reward-function signature."""
    return [digit_reward(c) for c in completions]


def build_workload(folder: Path, num_prompts: int = 64) -> Path:
    """Save the random Qwen3-MoE, its char tokenizer and ``prompts.jsonl`` under ``folder``."""
    import torch
    import transformers

    from lit_moe_rl.policy import char_tokenizer
    from lit_moe_rl.tiny import tiny_moe_config

    tok = char_tokenizer(ALPHABET)
    config = tiny_moe_config("qwen3_moe", vocab_size=len(tok), **MODEL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"prompt": f"Question {i}: what is {i % 17} + {3 * i % 23}? Answer:"} for i in range(num_prompts)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lit_command(folder: Path, steps: int, out: Path, logs: Path) -> list[str]:
    """``lit-moe-rl fit`` on the workload (the module run with this interpreter, so the checkout's code)."""
    return [
        *timed_fit_command(
            steps, out, prompts=folder / "prompts.jsonl", batch_size=PROMPTS_PER_STEP, group_size=GROUP,
            max_new_tokens=MAX_NEW_TOKENS,
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


def trl_worker(folder: Path, steps: int, out: Path, gradient_checkpointing: bool | None) -> None:
    """Train with TRL's GRPOTrainer (in this process) and write the step-end times to ``out``."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []
    lengths: list[float] = []
    logged: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                logged.append(logs)

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
        num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS,
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
    trainer = GRPOTrainer(
        model=str(folder),
        reward_funcs=trl_digit_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        callbacks=[Timer()],
    )
    assert trainer.model.dtype == torch.float32, trainer.model.dtype
    trainer.train()
    out.write_text(json.dumps({"ends": ends, "lengths": lengths, "logs": logged}))


def run(name: str, folder: Path, steps: int, threads: int, work: Path) -> dict[str, list[float]]:
    """One subprocess run of trainer ``name``; ``{"step_s": steps 2..N, "lengths": ...}``."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = work / f"{slug}-{time.monotonic_ns()}.json"
    if name == "lit-moe-rl":
        command = lit_command(folder, steps, out, work / "lit-logs")
    else:
        gc = {"TRL (defaults)": None, "TRL (no grad ckpt)": False}[name]
        command = [sys.executable, __file__, "--worker", json.dumps([str(folder), steps, str(out), gc])]
    result = run_timed(command, work, out, threads, name)
    return {"step_s": result["step_s"], "lengths": result["lengths"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (median over 2..N)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each trainer")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each trainer")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 repeat: checks that it all runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, logs and timings here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 3, 1
    if args.steps < 2:
        parser.error(f"--steps: must be >= 2 (step 1 is dropped), got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        folder, steps, out, gc = json.loads(args.worker)
        trl_worker(Path(folder), steps, Path(out), gc)
        return
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder = build_workload(work / "model")
        names = ["lit-moe-rl", "TRL (defaults)", "TRL (no grad ckpt)"]
        results: dict[str, dict[str, list[float]]] = {n: {"step_s": [], "lengths": []} for n in names}
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                for key, values in run(name, folder, args.steps, args.threads, work).items():
                    results[name][key] += values
                print(f"  ran {name} ({args.steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
        report(results, args)


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    """Each trainer's median s/step, then ``ratio lit/TRL throughput=X.XX`` (the faster TRL counts)."""
    print(
        f"workload: {PROMPTS_PER_STEP} prompts x {GROUP} completions x <= {MAX_NEW_TOKENS} tokens, fp32, {args.threads} threads; "
        f"median over steps 2..{args.steps} of {args.repeats} run(s) each"
    )
    median = {name: statistics.median(r["step_s"]) for name, r in results.items()}
    for name, r in results.items():
        length = statistics.mean(r["lengths"]) if r["lengths"] else float("nan")
        tokens_per_s = PROMPTS_PER_STEP * GROUP * length / median[name]
        print(
            f"{name:<20} s/step={median[name]:.3f}  (tokens per completion {length:.1f}, ~{tokens_per_s:.0f} tokens/s)"
        )
    trl = min(median["TRL (defaults)"], median["TRL (no grad ckpt)"])
    print(f"ratio lit/TRL throughput={trl / median['lit-moe-rl']:.2f}")


if __name__ == "__main__":
    main()
