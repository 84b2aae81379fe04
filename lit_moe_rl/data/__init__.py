"""Prompt data: a synthetic Countdown generator, JSONL/Parquet prompt files or ``datasets`` folders, and the
DataModule.

``PromptDataModule`` and ``collate_prompts`` are imported on first access, so the generator and
file loader can be used without importing Lightning (several seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lit_moe_rl.data.countdown import TEMPLATES, format_completion, format_prompt, generate_countdown
from lit_moe_rl.data.files import load_prompt_file

if TYPE_CHECKING:
    from lit_moe_rl.data.datamodule import PromptDataModule, collate_prompts

__all__ = [
    "TEMPLATES",
    "PromptDataModule",
    "collate_prompts",
    "format_completion",
    "format_prompt",
    "generate_countdown",
    "load_prompt_file",
]


def __getattr__(name: str) -> Any:
    """Import the Lightning-based names lazily."""
    if name in ("PromptDataModule", "collate_prompts"):
        from lit_moe_rl.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
