"""A character-level tokenizer with a Qwen-style chat template, for the calculator example's tiny model.

    python examples/calculator/tokenizer.py runs/calculator_tokenizer

``<|im_start|>`` and ``<|im_end|>`` are special tokens; the template renders ``system``, ``user``,
``assistant`` and ``tool`` turns as Qwen's does (tool results inside ``<tool_response>`` in a user
turn) and is prefix-preserving: rendering a later turn never changes an earlier one.
"""

from __future__ import annotations

import string
import sys

from lit_moe_rl.policy import char_tokenizer

TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build(path: str | None = None):
    """The tokenizer (saved at ``path`` when given); 4 + 97 characters + 2 special tokens (< 128 ids)."""
    alphabet = "".join(c for c in string.printable if c not in "\r\x0b\x0c\t")
    tok = char_tokenizer(alphabet)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    tok.padding_side = "left"
    if path:
        tok.save_pretrained(path)
    return tok


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "runs/calculator_tokenizer")
