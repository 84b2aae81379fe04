"""Prompt encoding: left truncation keeps the question, chat messages go through the chat template, and
special tokens are added the way the checkpoint's tokenizer adds them (never twice)."""

from __future__ import annotations

import string

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lit_moe_rl.policy import load_tokenizer, resolve_pretrained
from lit_moe_rl.rollout.prompts import encode_prompts, prompt_error, prompt_text

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tok(*, add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None):
    """A character tokenizer over printable ASCII; optionally a post-processor adding <bos> / <eos>, as
    Llama/Mixtral/DeepSeek checkpoints ship (``TemplateProcessing``)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if add_bos or add_eos:
        single = ("<bos> " if add_bos else "") + "$A" + (" <eos>" if add_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<bos>", 1), ("<eos>", 2)]
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.padding_side = "left"
    tok.chat_template = chat_template
    return tok


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_left_truncation_keeps_the_question() -> None:
    tok = char_tok()
    long = "Some long preamble that does not matter. Question: 3+4?"
    enc = encode_prompts(tok, [long, "2+2?"], max_prompt_len=12)
    assert enc["input_ids"].shape == (2, 12)
    assert tok.decode(enc["input_ids"][0]) == long[-12:]
    # the short prompt is left-padded: mask zeros first, then its 4 tokens
    assert enc["attention_mask"][1].tolist() == [0] * 8 + [1] * 4
    assert enc["input_ids"][1, :8].tolist() == [tok.pad_token_id] * 8
    assert enc["input_ids"][1, 8:].tolist() == ids_of(tok, "2+2?")


def test_no_limit_and_plain_tokenizer_match_the_tokenizer() -> None:
    tok = char_tok()
    enc = encode_prompts(tok, ["ab", "abcd"], max_prompt_len=None)
    ref = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert enc["input_ids"].equal(ref["input_ids"]) and enc["attention_mask"].equal(ref["attention_mask"])


def test_bos_kept_for_a_tokenizer_that_adds_it() -> None:
    tok = char_tok(add_bos=True)
    assert tok("ab")["input_ids"][0] == tok.bos_token_id  # the checkpoint's own behaviour
    enc = encode_prompts(tok, ["ab", "Question: 3+4?"], max_prompt_len=6)
    assert enc["input_ids"][0].tolist() == [0, 0, 0, 1] + ids_of(tok, "ab")
    # truncation keeps BOS in front of the END of the prompt
    assert enc["input_ids"][1].tolist() == [1] + ids_of(tok, " 3+4?")


def test_trailing_eos_of_a_post_processor_is_dropped() -> None:
    tok = char_tok(add_bos=True, add_eos=True)
    assert tok("ab")["input_ids"][-1] == tok.eos_token_id
    enc = encode_prompts(tok, ["ab"], max_prompt_len=None)
    assert enc["input_ids"][0].tolist() == [1] + ids_of(tok, "ab")


def test_chat_messages_through_the_chat_template() -> None:
    tok = char_tok(chat_template=CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "3+4?"}]
    enc = encode_prompts(tok, [messages, "plain"], max_prompt_len=None)
    expected = [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")] + ids_of(tok, "3+4?\n")
    expected += [tok.convert_tokens_to_ids("<|assistant|>")]
    assert enc["input_ids"][0].tolist() == expected
    assert enc["attention_mask"][0].all()
    # a template that renders BOS keeps it under left truncation (it is the lead, not the question)
    short = encode_prompts(tok, [messages], max_prompt_len=4)["input_ids"][0].tolist()
    assert short == [tok.bos_token_id] + expected[-3:]


def test_chat_template_bos_is_not_doubled() -> None:
    tok = char_tok(add_bos=True, chat_template=CHAT_TEMPLATE)
    enc = encode_prompts(tok, [[{"role": "user", "content": "hi"}]], max_prompt_len=None)
    ids = enc["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|user|>hi\n<|assistant|>"


def test_chat_prompt_without_chat_template_is_a_one_line_error() -> None:
    tok = char_tok()
    with pytest.raises(ValueError, match=r"model\.tokenizer: .*'chat_template'") as err:
        encode_prompts(tok, [[{"role": "user", "content": "hi"}]], max_prompt_len=None)
    assert "\n" not in str(err.value)


def test_bad_inputs() -> None:
    tok = char_tok(add_bos=True)
    with pytest.raises(ValueError, match="rollout.engine.max_prompt_len: must be >= 1"):
        encode_prompts(tok, ["ab"], max_prompt_len=0)
    with pytest.raises(ValueError, match="rollout.engine.max_prompt_len: 1 leaves no room"):
        encode_prompts(tok, ["ab"], max_prompt_len=1)
    with pytest.raises(ValueError, match="message 0"):
        encode_prompts(tok, [[{"content": "no role"}]], max_prompt_len=None)
    assert prompt_error(3) and prompt_error([]) and prompt_error("x") is None
    assert prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == (
        "system: be brief\nuser: hi"
    )


def test_quickstart_tokenizer_adds_no_special_tokens() -> None:
    """The quickstart model was warm-started without BOS: its encoding must stay exactly what it was."""
    path = resolve_pretrained("builtin:countdown-tiny-moe")
    tok = load_tokenizer(path, vocab_size=10_000)
    prompts = ["3 5 7 => 22 =", "12 4 => 3 ="]
    enc = encode_prompts(tok, prompts, max_prompt_len=None)
    old = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["input_ids"].equal(old["input_ids"]) and enc["attention_mask"].equal(old["attention_mask"])
    assert tok.bos_token_id not in enc["input_ids"].tolist()[0]


def test_chat_rows_from_the_datamodule_encode(tmp_path) -> None:
    """A JSONL of chat-message prompts -> DataModule batch -> encoded prompts, rendered by the template."""
    import json

    from lit_moe_rl.data import PromptDataModule

    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "answer": i + 1} for i in range(4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PromptDataModule(source="file", path=str(path), num_val=1, batch_size=3, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = char_tok(chat_template=CHAT_TEMPLATE)
    enc = encode_prompts(tok, batch["prompt"], max_prompt_len=None)
    texts = tok.batch_decode(enc["input_ids"], skip_special_tokens=False)
    assert texts == [f"<bos><|user|>{i}+1?\n<|assistant|>" for i in range(3)]


def test_split_lead_cases() -> None:
    """(tokenizer prefix, template BOS) -> the lead kept in front and the body that may be truncated."""
    from lit_moe_rl.rollout.prompts import split_lead

    assert split_lead([5, 6], [1, 5, 6], bos_token_id=1) == ([1], [5, 6])  # tokenizer adds BOS
    assert split_lead([1, 5, 6], [1, 1, 5, 6], bos_token_id=1) == ([1], [5, 6])  # template rendered it too
    assert split_lead([1, 5, 6], [1, 5, 6], bos_token_id=1) == ([1], [5, 6])  # only the template renders it
    assert split_lead([5, 6], [5, 6, 2], bos_token_id=1) == ([], [5, 6])  # a trailing EOS is dropped
    assert split_lead([5, 6], [5, 6], bos_token_id=None) == ([], [5, 6])
    assert split_lead([5, 6], [1, 7, 8], bos_token_id=1) == ([], [1, 7, 8])  # specials changed the split


def test_engine_generates_from_chat_and_bos_prompts_with_the_question_kept() -> None:
    """Through HFEngine: chat messages rendered, the tokenizer's BOS first, a long prompt cut from the left."""
    from lit_moe_rl.policy import load_policy
    from lit_moe_rl.rollout.engine import HFEngine

    tok = char_tok(add_bos=True, chat_template=CHAT_TEMPLATE)
    model, _ = load_policy(config={"family": "qwen3_moe", "vocab_size": len(tok)})
    engine = HFEngine(max_new_tokens=3, max_prompt_len=8)
    engine.bind(model, tok)
    question = "a long preamble, then: 3+4?"
    gen = engine.generate([[{"role": "user", "content": question}], question], n=2, greedy=True)
    prompts = gen.input_ids[:, : gen.prompt_len]
    assert gen.prompt_len == 8 and prompts.shape[0] == 4
    chat, plain = prompts[0].tolist(), prompts[2].tolist()
    assert chat == [tok.bos_token_id, *ids_of(tok, " 3+4?\n"), tok.convert_tokens_to_ids("<|assistant|>")]
    assert plain == [tok.bos_token_id, *ids_of(tok, "n: 3+4?")]
    assert torch.equal(prompts[0], prompts[1]) and gen.attention_mask[:, : gen.prompt_len].all()


def test_sft_encodes_prompts_as_the_engine_does() -> None:
    """The warm start must train on the prompt tokens RL samples from: BOS included when the tokenizer adds it."""
    from lit_moe_rl.sft import SFTModule

    tok = char_tok(add_bos=True)
    module = SFTModule(config={"family": "qwen3_moe", "vocab_size": len(tok)})
    module.tokenizer = tok
    ids, attn, loss_mask = module.encode(["1 2 =>", "12 3 =>"], ["3", "15"])
    engine_rows = encode_prompts(tok, ["1 2 =>", "12 3 =>"], max_prompt_len=None)["input_ids"]
    for row, n_completion, engine_row in zip(ids.tolist(), (2, 3), engine_rows.tolist(), strict=True):
        prompt = [t for t in row[:-n_completion] if t != tok.pad_token_id]
        assert prompt == [t for t in engine_row if t != tok.pad_token_id] and prompt[0] == tok.bos_token_id
    assert loss_mask.sum(-1).tolist() == [2, 3]  # completion + EOS only
    assert attn.sum(-1).tolist() == [1 + 6 + 2, 1 + 7 + 3]
