"""The engine's prefills skip the experts on padding (issue 17): left-padded prompts and the holes of a
multi-turn observation chunk. Every real token's computation is unchanged, so tokens, μ and R3 routes
are bitwise those of a loop that computes every token."""

from __future__ import annotations

import contextlib

import torch

from lit_moe_rl import experts
from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout import decode as decode_module
from lit_moe_rl.rollout.sampling import SamplingParams
from lit_moe_rl.routing.record import record_routes
from tests.test_multiturn import _run

PROMPTS = ["3 5 7 => 22 =", "12 =>", "1 =>"]


def _every_token(monkeypatch) -> None:
    """The loops as they were before skipping: every token through the experts (both loops' prefills
    go through ``_Stepper.real_tokens``, in the decode module)."""
    monkeypatch.setattr(decode_module, "real_tokens_only", lambda mask: contextlib.nullcontext())


def _count_expert_tokens(monkeypatch) -> list[int]:
    seen: list[int] = []
    routed = experts._routed_experts

    def spy(self, hidden_states, *args):
        seen.append(hidden_states.shape[0])
        return routed(self, hidden_states, *args)

    monkeypatch.setattr(experts, "_routed_experts", spy)
    return seen


def _decode(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3)
    with record_routes(model) as recorder:
        out = decode_module.decode(model, enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=16,
                                   params=SamplingParams(), eos_token_ids=[2], pad_token_id=0, recorder=recorder)  # fmt: skip
    return out, enc["attention_mask"]


def test_the_prompt_prefill_runs_the_experts_on_real_tokens_only_and_samples_the_same(monkeypatch):
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    seen = _count_expert_tokens(monkeypatch)
    ours, mask = _decode(model, tok)
    layers = model.config.num_hidden_layers
    assert (
        seen[:layers] == [int(mask.sum())] * layers and int(mask.sum()) < mask.numel()
    )  # the prefill's calls
    _every_token(monkeypatch)
    seen.clear()
    theirs, _ = _decode(model, tok)
    assert seen[:layers] == [mask.numel()] * layers
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.logp, theirs.logp)
    assert torch.equal(ours.routes, theirs.routes)


def test_multi_turn_observation_chunks_skip_their_holes_and_sample_the_same(monkeypatch):
    seen = _count_expert_tokens(monkeypatch)
    *_, ours = _run()
    ours_calls, ours_tokens = len(seen), sum(seen)
    seen.clear()
    _every_token(monkeypatch)
    *_, theirs = _run()
    assert len(seen) == ours_calls and ours_tokens < sum(seen)  # the same forwards, fewer expert tokens
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.infer_logp, theirs.infer_logp)
    assert torch.equal(ours.routes, theirs.routes)


def test_model_skip_padding_false_reaches_the_engine(monkeypatch):
    """``model.skip_padding: false`` (the run summary's ``padding skipped off``) holds for the engine's
    prefills too: the rollout callback hands the setting to the engine it binds."""
    from types import SimpleNamespace

    from lit_moe_rl.callbacks.rollout import RolloutCallback
    from lit_moe_rl.rollout.engine import HFEngine

    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    seen = _count_expert_tokens(monkeypatch)
    for setting in (False, True):
        callback = RolloutCallback(engine=HFEngine(max_new_tokens=4))
        callback._bind(SimpleNamespace(hparams={"skip_padding": setting}, policy=model, tokenizer=tok))
        assert callback.engine.skip_padding is setting
        seen.clear()
        callback.engine.generate(PROMPTS, n=2)
        mask = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)["attention_mask"]
        assert seen[0] == (int(mask.sum()) if setting else mask.numel())
