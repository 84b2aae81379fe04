"""Tokens in, tokens out: observation tokens as a suffix of the chat template's rendering.

Sampled tokens are never re-encoded. After a turn, the conversation gets the turn's decoded text as
an assistant message (used only to render the template), and the observation's tokens are

    closing tail of the sampled turn  +  render(conversation + observation, generation prompt)
                                         minus render(conversation)

so everything the template adds at a turn boundary (the ``\\n`` after ``<|im_end|>``, the next role
header, or a whole ``<|im_end|>\\n`` when a stop string such as ``</tool_call>`` ended the turn)
belongs to the observation: attended, never trained. This is only right when the template is
*prefix-preserving* (rendering a later turn never changes an earlier one); :func:`check_template`
probes that at start-up and refuses a template that is not (Qwen3's stock template drops earlier
``<think>`` blocks). Plain-text environments (no chat template) append the observation text's tokens.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ObservationEncoder", "check_template"]

_PROBE_THINK = "<think>\nprobe reasoning\n</think>\n\nprobe answer"


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _refuse(what: str) -> ValueError:
    return ValueError(
        f"rollout.env: the tokenizer's chat template is not prefix-preserving ({what}), so observation tokens "
        "cannot be appended as a suffix; give model.tokenizer a chat_template that renders every earlier turn "
        "unchanged (for Qwen3: one that keeps earlier <think> blocks)"
    )


def check_template(tokenizer: Any) -> str:
    """Probe a 2-turn conversation; return the closing text the template puts after an assistant turn.

    Checks that the generation prompt, each assistant turn and each later user/tool turn only append
    to the text rendered before them.
    """
    user = {"role": "user", "content": "probe question"}
    turn1 = {"role": "assistant", "content": _PROBE_THINK}
    user2 = {"role": "user", "content": "probe feedback"}
    turn2 = {"role": "assistant", "content": "probe second answer"}
    prompt = _render(tokenizer, [user], True)
    after1 = _render(tokenizer, [user, turn1], False)
    if not after1.startswith(prompt):
        raise _refuse("an assistant turn does not start with the generation prompt")
    prompt2 = _render(tokenizer, [user, turn1, user2], True)
    if not prompt2.startswith(after1):
        raise _refuse("rendering a second turn changed the first")
    if not _render(tokenizer, [user, turn1, user2, turn2], False).startswith(prompt2):
        raise _refuse("an assistant turn does not start with the generation prompt")
    answer_end = after1.rfind("probe answer")
    if answer_end < len(prompt):
        raise _refuse("the assistant's text is not rendered as given")
    return after1[answer_end + len("probe answer") :]


class ObservationEncoder:
    """Turns an environment's observation into the token ids appended after a sampled turn."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.closing = check_template(tokenizer) if chat else ""

    def start(self, prompt: Any) -> list[dict[str, Any]]:
        """The conversation a trajectory starts with (its prompt messages; empty for plain text)."""
        return [dict(m) for m in prompt] if self.chat else []

    def encode(
        self, conversation: list[dict[str, Any]], action: str, stop_text: str, observation: Any
    ) -> list[int]:
        """Token ids of ``observation`` after a turn whose decoded text is ``action`` (``conversation``
        is extended in place). ``stop_text``: the decoded EOS token the turn ended with ('' if none)."""
        if not self.chat:
            if not isinstance(observation, str):
                raise ValueError("rollout.env: a plain-text environment (no chat prompts) must return text")
            return self._ids(observation)
        conversation.append({"role": "assistant", "content": action})
        before = _render(self.tokenizer, conversation, False)
        conversation.extend(_messages(observation))
        after = _render(self.tokenizer, conversation, True)
        if not after.startswith(before):
            raise _refuse("an observation changed the earlier turns")
        tail = (
            self.closing[len(stop_text) :]
            if stop_text and self.closing.startswith(stop_text)
            else self.closing
        )
        return self._ids(tail + after[len(before) :])

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _messages(observation: Any) -> list[dict[str, Any]]:
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, list) and all(isinstance(m, dict) and "role" in m for m in observation):
        return [dict(m) for m in observation]
    raise ValueError(f"rollout.env: an observation must be text or chat messages, got {observation!r}")
