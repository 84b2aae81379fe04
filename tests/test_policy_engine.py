"""Policy loading, chunked per-token log-probs, and the HF rollout engine."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from lit_moe_rl.policy import (
    char_tokenizer,
    load_policy,
    logprob_chunk_tokens,
    position_ids_from_mask,
    resolve_pretrained,
    token_logprobs,
)
from lit_moe_rl.rollout.engine import HFEngine, response_mask_from
from lit_moe_rl.tiny import FAMILIES


def _batch(tok, prompts=("3 5 7 => 22 =", "1 2 => 3 ="), completions=("3*5+7", "1+2")):
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    prompt_len = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    resp = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    width = max(map(len, resp))
    resp_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in resp])
    resp_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in resp])
    assert enc["input_ids"].shape[1] == prompt_len and len(texts) == 2
    ids = torch.cat([enc["input_ids"], resp_ids], dim=1)
    attn = torch.cat([enc["attention_mask"], resp_mask], dim=1)
    return ids, attn, prompt_len, resp_mask.bool()


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_logprobs_match_full_logits_and_gradients(family):
    model, tok = load_policy(config={"family": family})
    ids, attn, prompt_len, mask = _batch(tok)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    full = torch.log_softmax(logits[:, prompt_len - 1 : -1].float() / 0.7, -1)
    expected = full.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)
    logp, entropy, _ = token_logprobs(
        model, ids, attn, prompt_len, temperature=0.7, chunk_size=2, with_entropy=True
    )
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], -(full.exp() * full).sum(-1)[mask], rtol=1e-4, atol=1e-5)
    assert not mask.all() and (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()  # padding skipped

    (g_full,) = torch.autograd.grad(expected[mask].sum(), model.get_output_embeddings().weight)
    logp, _, _ = token_logprobs(model, ids, attn, prompt_len, temperature=0.7, chunk_size=2)
    (g_chunk,) = torch.autograd.grad(logp[mask].sum(), model.get_output_embeddings().weight)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=1e-6)


def test_load_policy_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained: '/nope' is not a local directory"):
        resolve_pretrained("/nope")
    with pytest.raises(ValueError, match="need network"):
        resolve_pretrained("Qwen/Qwen3-30B-A3B")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no built-in model"):
        resolve_pretrained("builtin:nope")
    with pytest.raises(ValueError, match="exactly one of"):
        load_policy()
    with pytest.raises(ValueError, match="unknown 'nope'"):
        load_policy(config={"family": "nope"})


def test_save_and_load_round_trip_with_aux_loss_note(tmp_path, caplog):
    model, tok = load_policy(config={"family": "qwen3_moe"})
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="lit_moe_rl.policy"):
        loaded, tok2 = load_policy(str(tmp_path))
    assert "load-balancing aux loss is OFF" in caplog.text
    ids = torch.tensor([tok2("3 5 7 => 22 =")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok2.padding_side == "left"


def test_char_tokenizer_round_trips_countdown_text():
    tok = char_tokenizer()
    text = "12 5 7 => 67 =12*5+7"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_response_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, truncated = response_mask_from(tokens, 2)
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def _engine(model, tok, **kwargs):
    engine = HFEngine(max_new_tokens=5, **kwargs)
    engine.bind(model, tok)
    return engine


def test_engine_logprobs_match_the_trainer_on_shared_weights():
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe"})
    gen = _engine(model, tok, temperature=0.8).generate(["3 5 7 => 22 =", "1 2 => 3 ="], n=3)
    assert gen.input_ids.shape[0] == 6 and gen.response_mask.shape == gen.infer_logp.shape
    logp, _, _ = token_logprobs(model, gen.input_ids, gen.attention_mask, gen.prompt_len, temperature=0.8)
    torch.testing.assert_close(
        logp[gen.response_mask], gen.infer_logp[gen.response_mask], rtol=1e-4, atol=1e-4
    )
    assert (
        gen.input_ids[:, : gen.prompt_len].view(2, 3, -1) == gen.input_ids[::3, None, : gen.prompt_len]
    ).all()


def test_bf16_engine_keeps_its_own_copy_and_syncs():
    model, tok = load_policy(config={"family": "qwen3_moe"})
    engine = _engine(model, tok, dtype="bfloat16")
    assert engine.model is not model and next(engine.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    engine.sync_weights(model)
    for (name, p), q in zip(model.named_parameters(), engine.model.parameters(), strict=True):
        torch.testing.assert_close(q.float(), p.to(torch.bfloat16).float(), msg=name)


def test_engine_validates_settings():
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFEngine(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        HFEngine(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        HFEngine(top_p=1.5)


def test_greedy_generation_is_deterministic():
    model, tok = load_policy(config={"family": "mixtral"})
    engine = _engine(model, tok)
    a = engine.generate(["3 5 7 => 22 ="], n=1, greedy=True)
    b = engine.generate(["3 5 7 => 22 ="], n=1, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids)
    assert isinstance(model, transformers.PreTrainedModel)


def test_default_logprob_chunk_keeps_fp32_logits_within_the_device_budget():
    # CPU: 32 MiB of [tokens, V] fp32 logits (glibc mmaps bigger blocks anew on every use); GPU: 1 GiB
    assert logprob_chunk_tokens(151936, torch.device("cpu")) == 55  # 55 x 151,936 x 4 B = 31.9 MiB
    assert logprob_chunk_tokens(151936, torch.device("cuda")) == 1766  # 1,766 x 151,936 x 4 B = 1.0 GiB
    assert logprob_chunk_tokens(32, torch.device("cpu")) == 4096  # capped for small vocabularies
    assert logprob_chunk_tokens(10**9, torch.device("cpu")) == 1
