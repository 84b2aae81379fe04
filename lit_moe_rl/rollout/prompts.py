"""Prompt encoding for rollouts: plain strings or chat messages, the tokenizer's own special tokens,
left truncation that keeps the question, left padding.

A prompt is either the text itself or a list of chat messages ``[{"role": ..., "content": ...}]`` (what
TRL users bring). Messages are rendered by the tokenizer's chat template with the generation prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Prompt = str | list[dict[str, Any]]


def prompt_error(prompt: Any) -> str | None:
    """Why ``prompt`` is neither a string nor a list of ``{"role": str, "content": ...}`` messages (None if it is)."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list) or not prompt:
        return f"is a {type(prompt).__name__}, expected the prompt text or a non-empty list of chat messages"
    for i, message in enumerate(prompt):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or "content" not in message
        ):
            return f'message {i} is not {{"role": str, "content": ...}}'
    return None


def prompt_text(prompt: Prompt) -> str:
    """A readable string form of a prompt (for logs and sample tables): chat messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt text: a string as is; chat messages through the tokenizer's chat template with the
    generation prompt (``apply_chat_template(..., add_generation_prompt=True)``)."""
    if isinstance(prompt, str):
        return prompt
    error = prompt_error(prompt)
    if error is not None:
        raise ValueError(f"prompt: {error}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "model.tokenizer: chat-message prompts need a tokenizer with a chat template, and this one has no "
            "'chat_template' (set it in tokenizer_config.json, or write the prompts as strings)"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    max_prompt_len: int | None,
    max_new_tokens: int = 0,
    max_positions: int | None = None,
) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}``, both ``[B, P]`` long, left-padded with the pad token.

    Each row is :func:`prompt_token_rows`'s: the tokenizer's own special tokens, the end of a long prompt.
    With ``max_positions`` (the model's ``max_position_embeddings``), a prompt that leaves no room for
    ``max_new_tokens`` inside it is warned about once (:func:`note_positions`).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("model.tokenizer: has no pad token (set pad_token in tokenizer_config.json)")
    rows = prompt_token_rows(tokenizer, prompts, max_prompt_len=max_prompt_len)
    note_positions(rows, max_new_tokens, max_positions)
    return left_pad(rows, tokenizer.pad_token_id)


_WARNED: set[str] = set()


def warn_once(kind: str, message: str) -> None:
    """One warning per ``kind`` and process, on rank zero."""
    if kind in _WARNED:
        return
    _WARNED.add(kind)
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(message)


def note_positions(rows: list[list[int]], max_new_tokens: int, max_positions: int | None) -> None:
    """Warn (once) when a prompt plus ``max_new_tokens`` runs past the model's position embeddings: the
    model then attends at positions it was never trained on (RoPE extrapolates silently)."""
    if not max_positions or not rows:
        return
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    need = len(rows[longest]) + max_new_tokens
    if need > max_positions:
        warn_once(
            "positions",
            f"rollout.engine.max_prompt_len: a prompt of {len(rows[longest])} tokens plus max_new_tokens "
            f"{max_new_tokens} needs {need} positions, but the model has max_position_embeddings {max_positions}: "
            f"it will generate past its trained positions (set rollout.engine.max_prompt_len <= "
            f"{max(max_positions - max_new_tokens, 1)} to cut long prompts from the left; warned once)",
        )


def note_unknown_characters(tokenizer: Any, texts: list[str], bodies: list[list[int]]) -> None:
    """Warn (once) when a prompt holds characters the tokenizer maps to its unknown token (emoji on a
    character-level vocabulary): the model sees ``<unk>`` where the text had them."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        return
    for i, body in enumerate(bodies):
        if unk in body:
            chars = unknown_characters(tokenizer, texts[i], unk)
            warn_once(
                "unknown",
                f"data: prompt {i} of a batch has characters the tokenizer does not know ({chars}); they are "
                f"encoded as {tokenizer.unk_token!r} and the model never sees them (warned once)",
            )
            return


def unknown_characters(tokenizer: Any, text: str, unk: int) -> str:
    """The text spans that encode to ``unk`` (a fast tokenizer's offsets), quoted; ``'?'`` without offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return "'?'"
    spans = [text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if t == unk]
    return ", ".join(repr(s) for s in dict.fromkeys(spans)) or "'?'"


def prompt_token_rows(
    tokenizer: Any, prompts: list[Prompt], *, max_prompt_len: int | None
) -> list[list[int]]:
    """The token ids of each prompt, as the rollout engine (and the SFT warm start) feed them.

    Special tokens are those the tokenizer itself adds in front of a text (``add_special_tokens=True``:
    Llama/Mixtral/DeepSeek add BOS, Qwen adds nothing). A rendered chat template that already begins
    with them does not get them twice, and tokens the tokenizer would append after the text (an EOS
    or SEP) are dropped: a generation prompt must not end the sequence.

    A prompt longer than ``max_prompt_len`` keeps its END (the question and the generation prompt) and
    its leading special tokens: ``lead + body[-(max_prompt_len - len(lead)):]``.
    """
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"rollout.engine.max_prompt_len: must be >= 1, got {max_prompt_len}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    note_unknown_characters(tokenizer, texts, bodies)
    fulls = tokenizer(texts, add_special_tokens=True)["input_ids"]
    rows = []
    for i, (body, full) in enumerate(zip(bodies, fulls, strict=True)):
        lead, body = split_lead(body, full, tokenizer.bos_token_id)
        rows.append(lead + truncate_left(body, max_prompt_len, len(lead)))
        if not rows[-1]:
            raise ValueError(f"prompts: prompt {i} is empty after tokenization")
    return rows


def split_lead(body: list[int], full: list[int], bos_token_id: int | None) -> tuple[list[int], list[int]]:
    """``(lead, body)``: the special tokens the tokenizer puts before ``body`` (from ``full``, its
    ``add_special_tokens=True`` encoding), and ``body`` without them if it already starts with them.

    With no tokenizer prefix, a BOS the text itself starts with (rendered by a chat template) is the lead,
    so that left truncation keeps it. Should the special tokens change how the text itself splits (``body``
    is not a run of ``full``), ``full`` is kept whole, as the tokenizer encodes it.
    """
    start = _find(full, body)
    if start is None:  # the special tokens changed how the text splits: keep the tokenizer's own encoding
        return [], full
    prefix = full[:start]
    if prefix and body[: len(prefix)] == prefix:
        return prefix, body[len(prefix) :]
    if not prefix and bos_token_id is not None and body[:1] == [bos_token_id]:
        return body[:1], body[1:]
    return prefix, body


def truncate_left(body: list[int], max_prompt_len: int | None, lead_len: int) -> list[int]:
    """The last ``max_prompt_len - lead_len`` tokens of ``body`` (all of it when there is no limit)."""
    if max_prompt_len is None:
        return body
    budget = max_prompt_len - lead_len
    if budget < 1:
        raise ValueError(
            f"rollout.engine.max_prompt_len: {max_prompt_len} leaves no room after the tokenizer's "
            f"{lead_len} leading special token(s)"
        )
    return body[-budget:]


def left_pad(rows: list[list[int]], pad_token_id: int) -> dict[str, Tensor]:
    """Token rows left-padded to the longest: ``{"input_ids", "attention_mask"}`` ``[B, P]`` long."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _find(full: list[int], body: list[int]) -> int | None:
    """Index of ``body`` as a contiguous run in ``full`` (the tokenizer's prefix is its length)."""
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return start
    return None
