"""The decode loop's KV caches: the doubling layer (issue 14 item 9: linear bytes copied per token) and
the cache written in place with ready 4-D masks (issue 17), each with the same values as transformers'
concatenating cache and bitwise the same generations."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout import decode as decode_module
from lit_moe_rl.rollout.kv import GrowingLayer
from lit_moe_rl.rollout.sampling import SamplingParams
from lit_moe_rl.routing.record import record_routes


def test_bytes_copied_per_token_stay_flat_at_8k():
    """Concatenation copies the whole cache each step (4096 positions per token on average at 8k);
    doubling buffers copy each position about twice."""
    layer = GrowingLayer()
    layer.update(torch.zeros(1, 1, 16, 2), torch.zeros(1, 1, 16, 2))
    for _ in range(8192):
        layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    length = 16 + 8192
    assert layer.keys.shape[-2] == length and bool(layer.keys[..., 16:, :].eq(1).all())
    assert layer.copied_positions / length < 3  # vs (length / 2) per token for concatenation


def test_same_keys_and_values_as_the_concatenating_layer_through_repeats_and_selections():
    torch.manual_seed(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    steps = [("update", 5), ("repeat", 3), ("update", 1), ("update", 4), ("select", [0, 2]), ("update", 1)]
    steps += [("update", 1)] * 40 + [("select", [1]), ("update", 7), ("reserve", 80), ("update", 1)]
    steps += [("update", 2)] * 12 + [("repeat", 2), ("update", 1), ("select", [1]), ("update", 3)]
    batch = 2
    for op, arg in steps:
        if op == "update":
            k, v = torch.randn(batch, 2, arg, 4), torch.randn(batch, 2, arg, 4)
            got, want = ours.update(k, v), theirs.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        elif op == "reserve":
            ours.reserve(arg)
            assert ours._k.shape[-2] == arg and torch.equal(ours.keys, theirs.keys)
        elif op == "repeat":
            ours.batch_repeat_interleave(arg)
            theirs.batch_repeat_interleave(arg)
            batch *= arg
        else:
            index = torch.tensor(arg)
            ours.batch_select_indices(index)
            theirs.batch_select_indices(index)
            batch = len(arg)
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_long_generations_use_the_doubling_cache_and_sample_the_same_tokens(family, monkeypatch):
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": family, "vocab_size": 64})
    enc = tok(["3 5 7 => 22 =", "12 =>"], return_tensors="pt", padding=True, add_special_tokens=False)
    layers = []
    original = decode_module._Stepper.__init__

    def spy(self, model, max_added=0, **kwargs):
        original(self, model, max_added, **kwargs)
        layers.extend(self.cache.layers)

    monkeypatch.setattr(decode_module._Stepper, "__init__", spy)
    monkeypatch.setattr(decode_module, "IN_PLACE", False)  # the rule for models that cannot write in place
    outs = []
    for grow_from in (10_000, 40):
        monkeypatch.setattr(decode_module, "GROW_FROM", grow_from)
        torch.manual_seed(3)
        outs.append(decode_module.decode(model, enc["input_ids"], enc["attention_mask"], n=3, max_new_tokens=40,
                                         params=SamplingParams(), eos_token_ids=[2], pad_token_id=0))  # fmt: skip
    assert any(isinstance(layer, GrowingLayer) for layer in layers)
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].logp, outs[1].logp)


PADDED, UNPADDED = ["3 5 7 => 22 =", "12 =>", "1 =>"], ["12 =>", "34 =>", "56 =>"]


def _decode(model, tok, in_place, monkeypatch, record=False, prompts=PADDED):
    monkeypatch.setattr(decode_module, "IN_PLACE", in_place)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    steppers = []
    original = decode_module._Stepper.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        steppers.append(self)

    monkeypatch.setattr(decode_module._Stepper, "__init__", spy)
    masks = []  # the attention mask of every decode step
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    torch.manual_seed(3)
    with record_routes(model) if record else contextlib.nullcontext() as recorder:
        out = decode_module.decode(model, enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=30,
                                   params=SamplingParams(), eos_token_ids=[2], pad_token_id=0, recorder=recorder)  # fmt: skip
    monkeypatch.setattr(decode_module._Stepper, "__init__", original)
    hook.remove()
    steppers[0].masks = masks[1:]  # after the prefill's
    return out, steppers[0]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_the_in_place_cache_with_ready_masks_samples_what_concatenation_samples(
    family, record, padded, monkeypatch
):
    """Left-padded prompts (a ready 4-D mask) or none (no mask, as transformers passes none), rows leaving
    the batch (EOS is common at vocab 24) and, with R3, rows fed their EOS once more: the same tokens,
    μ and routes, bitwise."""
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": family, "vocab_size": 24})
    prompts = PADDED if padded else UNPADDED
    (ours, stepper), (theirs, plain) = (
        _decode(model, tok, flag, monkeypatch, record, prompts) for flag in (True, False)
    )
    assert stepper.in_place and not plain.in_place
    if padded:
        assert all(m.dtype == torch.bool and m.dim() == 4 for m in stepper.masks)
    else:
        assert all(m is None for m in stepper.masks) and all(m.dim() == 2 for m in plain.masks)
    assert all(isinstance(layer, GrowingLayer) for layer in stepper.cache.layers)
    finished = (ours.tokens == 2).any(-1)
    assert 0 < int(finished.sum()) < 12 and ours.tokens.shape[1] > 5  # rows left before the end
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.logp, theirs.logp)
    assert (ours.routes is None) == (not record)
    if record:
        assert torch.equal(ours.routes, theirs.routes)


@pytest.mark.parametrize(
    "family, extra, attention",
    [("mixtral", {"sliding_window": 8}, "sdpa"), ("gpt_oss", {}, "eager"), ("qwen3_moe", {}, "eager")],
)
def test_sliding_windows_and_other_attention_keep_the_2d_mask(family, extra, attention, monkeypatch):
    """A sliding window masks more than the ready mask would, and ``eager`` adds float masks: these keep
    transformers' mask building (and its concatenating cache at short lengths)."""
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": family, "vocab_size": 24, **extra})
    model.set_attn_implementation(attention)
    out, stepper = _decode(model, tok, True, monkeypatch)
    assert not stepper.in_place and not any(isinstance(layer, GrowingLayer) for layer in stepper.cache.layers)
    assert out.tokens.shape[0] == 12


def test_decode_length_bench_runs():
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_decode_length", ROOT / "bench" / "decode_length.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--lengths", "200", "--rows", "2"])
    concat, doubling, in_place = rows
    assert doubling["copied_per_token"] < 4 and concat["copied_per_token"] > 25 * doubling["copied_per_token"]
    assert in_place["copied_per_token"] < 1.2  # each new position once, the prompt moved once
    assert decode_module.GROW_FROM == 256 and decode_module.IN_PLACE  # the bench restores the engine's rule


def test_scaling_bench_prints_time_per_token_against_response_length(tmp_path, capsys):
    import json
    import sys

    from tests.helpers import ROOT

    sys.path.insert(0, str(ROOT))
    from bench import scaling

    out = scaling.main(["--decode-lengths", "16", "64", "--G", "--response-len", "--experts", "--vocab",
                        "--out", str(tmp_path / "s")])  # fmt: skip
    lengths = out["decode_lengths"]
    assert [r["length"] for r in lengths] == [16, 64] and lengths[0]["vs_shortest"] == 1.0
    assert all(r["ms_per_token"] > 0 for r in lengths) and out["points"] == []
    assert "x shortest" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["decode_lengths"] == lengths
