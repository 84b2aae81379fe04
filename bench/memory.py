"""Resident memory over a quickstart run: after 50 steps it should be within 10% of after 10.

    HF_HUB_OFFLINE=1 python bench/memory.py [--steps 50] [--early 10] [--config configs/quickstart.yaml]

Runs the real CLI in this process with :class:`lit_moe_rl.callbacks.memory.MemoryCallback` (validation
off) and prints the resident set size (RSS, MiB) at step ``early`` and at the last step, and their
ratio. Growth would come from state kept across steps: routes, rollouts, logged tensors, metric state.
Prints numbers; it is not a timed test.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from lit_moe_rl.callbacks.memory import MemoryCallback
from lit_moe_rl.cli import main


def measure(config: str, steps: int, extra: list[str]) -> list[tuple[int, float]]:
    """RSS history ``[(step, MiB)]`` of one ``fit`` of ``steps`` steps."""
    seen: list[MemoryCallback] = []
    original = MemoryCallback.__init__

    def keep(self: MemoryCallback) -> None:
        original(self)
        seen.append(self)

    MemoryCallback.__init__ = keep  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as root:
        main([
            "fit", f"--config={config}", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.callbacks+=lit_moe_rl.callbacks.memory.MemoryCallback", *extra,
        ])  # fmt: skip
    MemoryCallback.__init__ = original  # type: ignore[method-assign]
    return seen[0].history


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    history = dict(measure(args.config, args.steps, extra))
    early, last = history[args.early], history[max(history)]
    print(f"rss after step {args.early}: {early:.1f} MiB")
    print(f"rss after step {max(history)}: {last:.1f} MiB")
    print(f"ratio: {last / early:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main_bench()
