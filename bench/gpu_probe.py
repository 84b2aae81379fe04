"""What ``bench/gpu_check.py``'s fits load by ``class_path`` so that the check can fail.

A random model earns no Countdown reward: every advantage is 0, so are the loss and the gradient, and a
wrong gradient could not be seen. Here:

* :func:`save_wide_tokenizer`: a character tokenizer covering the whole vocabulary (one Unicode
  character per id), so that every sampled token shows in the completion's text;
* :class:`EvenCharsReward`: the fraction of a completion's characters whose code point is even, a
  reward a random model earns about half the time per character, different for every completion
  (so group-normalised advantages are never all 0), and learnable;
* :class:`WeightProbe`: a strided sample of every parameter at the start and end of training, written
  to a JSON file: which tensors moved, by how much, and whether everything stayed finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lit_moe_rl.policy import CHAR_ALPHABET, char_tokenizer

SAMPLE = 65536  # elements kept per parameter tensor (strided over the whole tensor)


def save_wide_tokenizer(path: Path, vocab_size: int) -> Path:
    """A char tokenizer with ``vocab_size`` ids (the 4 specials, the Countdown alphabet, then code
    points from U+0100, surrogates skipped), saved at ``path``."""
    wide, code = [], 0x100
    while len(CHAR_ALPHABET) + len(wide) + 4 < vocab_size:
        if not 0xD800 <= code <= 0xDFFF:
            wide.append(chr(code))
        code += 1
    tok = char_tokenizer(CHAR_ALPHABET + "".join(wide))
    tok.save_pretrained(path)
    return path


class EvenCharsReward:
    """Fraction of ``completion``'s characters with an even code point (0 for an empty completion)."""

    thread_safe = True  # pure Python on strings: scored in threads

    def __call__(self, completion: str, sample: dict[str, Any]) -> float:
        return sum(ord(c) % 2 == 0 for c in completion) / len(completion) if completion else 0.0


def _local_sample(param: torch.Tensor) -> torch.Tensor:
    """A strided float32 CPU copy of (this rank's shard of) ``param``."""
    local = param.to_local() if hasattr(param, "to_local") else param
    flat = local.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    return flat[::step].float().cpu()


class WeightProbe(Callback):
    """Writes ``{"tensors", "moved", "not_moved", "max_abs_change", "moved_frac", "finite"}`` to ``path``
    at the end of training: per trainable parameter tensor, whether any sampled element changed."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.before: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {
            name: _local_sample(p) for name, p in pl_module.policy.named_parameters() if p.requires_grad
        }

    def on_train_end(self, trainer, pl_module) -> None:
        moved, not_moved, changed, total, biggest, finite = [], [], 0, 0, 0.0, True
        for name, p in pl_module.policy.named_parameters():
            if name not in self.before:
                continue
            after = _local_sample(p)
            diff = (after - self.before[name]).abs()
            finite = finite and bool(torch.isfinite(after).all())
            (moved if bool((diff > 0).any()) else not_moved).append(name)
            changed, total = changed + int((diff > 0).sum()), total + diff.numel()
            biggest = max(biggest, float(diff.max()) if diff.numel() else 0.0)
        report = {
            "tensors": len(self.before),
            "moved": len(moved),
            "not_moved": not_moved,
            "moved_frac": changed / max(total, 1),  # of the sampled elements
            "max_abs_change": biggest if math.isfinite(biggest) else str(biggest),
            "finite": finite,
        }
        if trainer.global_rank == 0:
            self.path.write_text(json.dumps(report, indent=2))
