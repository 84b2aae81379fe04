"""Supervised warm start (``lit-moe-rl sft``): teach a small model the task's format before RL.

A random-init model cannot learn Countdown from reward alone in minutes. This recipe trains it with
cross-entropy on ``prompt -> solution`` pairs from the synthetic generator, for a few hundred steps,
and exports a Hugging Face folder that ``model.pretrained`` loads (``<log_dir>/hf_model`` by default).
The quickstart's built-in model (``builtin:countdown-tiny-moe``) was made by ``configs/quickstart_sft.yaml``
with ``--model.export_dir=lit_moe_rl/assets/countdown-tiny-moe``.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_moe_rl.data.countdown import format_completion
from lit_moe_rl.policy import load_policy, position_ids_from_mask
from lit_moe_rl.rewards.countdown import CountdownReward
from lit_moe_rl.rollout.engine import HFEngine
from lit_moe_rl.rollout.prompts import prompt_token_rows
from lit_moe_rl.validation import at_least, check_module_settings


class SFTModule(L.LightningModule):
    """Next-token cross-entropy on the completion tokens of ``prompt + completion + EOS``."""

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        template: Literal["tinyzero", "qwen-instruct", "compact"] = "compact",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        max_new_tokens: int = 16,
        export_dir: str | None = "auto",
        multiturn_fraction: float = 0.0,
    ) -> None:
        """
        Args:
            pretrained: Local HF folder to start from (or ``builtin:<name>``).
            config: Inline config of a random model: ``{family: qwen3_moe, ...}``.
            tokenizer: Tokenizer folder (default: ``pretrained``; the char tokenizer for ``config``).
            template: Countdown prompt template; linked to ``data.template``.
            lr: AdamW learning rate, > 0 (cosine decay to 10% after warm-up).
            weight_decay: AdamW weight decay, >= 0.
            warmup_steps: Linear warm-up steps, >= 0.
            max_new_tokens: Completion budget of the greedy validation, >= 1.
            export_dir: Where to save the trained model as a HF folder at the end: ``auto`` =
                ``<log_dir>/hf_model`` (the run's own folder), a path, or null (don't). Rebuilding the
                shipped ``builtin:countdown-tiny-moe`` is a deliberate step:
                ``--model.export_dir=lit_moe_rl/assets/countdown-tiny-moe`` (README).
            multiturn_fraction: Share of rows (in [0, 1]) shown as multi-turn Countdown transcripts: a wrong
                attempt and its feedback as untrained context, then the solution
                (:func:`lit_moe_rl.envs.countdown.synthetic_transcript`); the warm start of
                ``configs/multiturn_countdown.yaml``. Needs the ``compact`` template.
        """
        super().__init__()
        check_module_settings(
            lr=lr,
            weight_decay=weight_decay,
            betas=(0.9, 0.999),
            warmup_steps=warmup_steps,
            grad_clip=0.0,
            logprob_chunk_size=1,
            router_aux_loss_coef=0.0,
        )
        at_least("model.max_new_tokens", max_new_tokens, 1)
        if not 0.0 <= multiturn_fraction <= 1.0:
            raise ValueError(f"model.multiturn_fraction: must be in [0, 1], got {multiturn_fraction}")
        if multiturn_fraction and template != "compact":
            raise ValueError(f"model.multiturn_fraction: needs template 'compact', got {template!r}")
        self.save_hyperparameters()
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        fmt = "plain" if template == "compact" else "tags"
        self.reward = CountdownReward(format=fmt)
        self.engine = HFEngine(max_new_tokens=max_new_tokens)

    def configure_model(self) -> None:
        if self.policy is None:
            hp = self.hparams
            self.policy, self.tokenizer = load_policy(
                hp.pretrained, hp.config, tokenizer=hp.tokenizer, seed=torch.initial_seed()
            )

    def on_fit_start(self) -> None:
        """Every training row needs the ``solution`` field the warm start learns to write."""
        rows = getattr(getattr(self.trainer, "datamodule", None), "train_rows", None) or []
        check_targets(rows)

    def encode(self, prompts: list[str], completions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Left-padded ``(input_ids, attention_mask, loss_mask)``; the loss covers completion + EOS.

        Prompts are tokenized as the rollout engine tokenizes them (the tokenizer's BOS, chat templates),
        so the warm start learns the distribution RL will sample from.
        """
        tok = self.tokenizer
        rows, loss_rows = [], []
        prompt_rows = prompt_token_rows(tok, prompts, max_prompt_len=None)
        for p, completion in zip(prompt_rows, completions, strict=True):
            c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(p + c)
            loss_rows.append([0] * len(p) + [1] * len(c))
        width = max(map(len, rows))
        pad = lambda row, value: [value] * (width - len(row)) + row  # noqa: E731
        ids = torch.tensor([pad(r, tok.pad_token_id) for r in rows], device=self.device)
        attn = torch.tensor([pad([1] * len(r), 0) for r in rows], device=self.device)
        loss_mask = torch.tensor([pad(m, 0) for m in loss_rows], device=self.device)
        return ids, attn, loss_mask

    def encode_segments(
        self, prompts: list[str], segments: list[list[tuple[str, bool]]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`encode` for multi-turn transcripts: each segment is followed by EOS when it is an
        attempt (its index is even), and carries loss (with that EOS) only when marked trained."""
        tok = self.tokenizer
        rows, loss_rows = [], []
        for p, parts in zip(prompt_token_rows(tok, prompts, max_prompt_len=None), segments, strict=True):
            row, mask = list(p), [0] * len(p)
            for i, (text, trained) in enumerate(parts):
                ids = tok(text, add_special_tokens=False)["input_ids"] + (
                    [tok.eos_token_id] if i % 2 == 0 else []
                )
                row += ids
                mask += [int(trained)] * len(ids)
            rows.append(row)
            loss_rows.append(mask)
        width = max(map(len, rows))
        pad = lambda row, value: [value] * (width - len(row)) + row  # noqa: E731
        ids = torch.tensor([pad(r, tok.pad_token_id) for r in rows], device=self.device)
        attn = torch.tensor([pad([1] * len(r), 0) for r in rows], device=self.device)
        return ids, attn, torch.tensor([pad(m, 0) for m in loss_rows], device=self.device)

    def _batch_tensors(self, batch: dict[str, Any], batch_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        completions = [format_completion(s, self.hparams.template) for s in batch["samples"]]
        fraction = self.hparams.get("multiturn_fraction", 0.0)
        if not fraction:
            return self.encode(batch["prompt"], completions)
        from lit_moe_rl.envs.countdown import synthetic_transcript

        rng = random.Random(self.global_step * 100_003 + batch_idx)
        segments = [
            synthetic_transcript(s, c, rng) if rng.random() < fraction else [(c, True)]
            for s, c in zip(batch["samples"], completions, strict=True)
        ]
        return self.encode_segments(batch["prompt"], segments)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        ids, attn, loss_mask = self._batch_tensors(batch, batch_idx)
        logits = self.policy(
            input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)
        ).logits
        target_mask = loss_mask[:, 1:].bool()
        loss = F.cross_entropy(logits[:, :-1][target_mask].float(), ids[:, 1:][target_mask])
        self.log("sft/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.engine.model is None:
            self.engine.bind(self.policy, self.tokenizer)
        gen = self.engine.generate(batch["prompt"], n=1, greedy=True)
        tokens = gen.input_ids[:, gen.prompt_len :].masked_fill(
            ~gen.response_mask, self.tokenizer.pad_token_id
        )
        texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        rewards = [self.reward(t, s) for t, s in zip(texts, batch["samples"], strict=True)]
        self.log("val/reward", sum(rewards) / len(rewards), prog_bar=True, batch_size=len(rewards))
        self.log("val/solved", sum(r == 1.0 for r in rewards) / len(rewards), batch_size=len(rewards))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(self.trainer.max_steps, hp.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / (hp.warmup_steps + 1)
            progress = (step - hp.warmup_steps) / max(total - hp.warmup_steps, 1)
            return 0.1 + 0.9 * 0.5 * (
                1 + math.cos(math.pi * min(progress, 1.0))
            )  # not a default-dtype tensor

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        out = export_path(self.hparams.export_dir, self.trainer.log_dir or self.trainer.default_root_dir)
        if out is not None and self.trainer.is_global_zero:
            self.policy.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            rank_zero_info(f"sft: exported the trained model to {out} (load it with model.pretrained={out})")


def check_targets(rows: list[dict[str, Any]], field: str = "solution") -> None:
    """A one-line error naming the first training row without ``field`` (the completion sft trains on)."""
    for i, row in enumerate(rows):
        if field not in row:
            raise ValueError(
                f"data: sft trains on each row's {field!r} field (the completion to learn), but training row {i} "
                f"has only {', '.join(map(repr, row)) or 'no fields'}: add {field!r} to the rows of data.path"
            )


def export_path(export_dir: str | None, log_dir: str) -> str | None:
    """The export folder: ``<log_dir>/hf_model`` for ``auto``, ``export_dir`` as given, or None."""
    if export_dir is None:
        return None
    return os.path.join(log_dir, "hf_model") if export_dir == "auto" else export_dir
