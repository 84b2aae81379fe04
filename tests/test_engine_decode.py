"""The engine's decode loop: HF greedy parity, every EOS, finished rows leave, R3 routes, seeding."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.policy import load_policy, position_ids_from_mask, token_logprobs
from lit_moe_rl.rollout.decode import decode
from lit_moe_rl.rollout.engine import HFEngine
from lit_moe_rl.rollout.sampling import SamplingParams
from lit_moe_rl.routing.record import record_routes
from lit_moe_rl.tiny import FAMILIES

PROMPTS = ["3 5 7 => 22 =", "1 2 => 3 =", "12 =>"]


def _engine(model, tok, **kwargs):
    engine = HFEngine(**({"max_new_tokens": 12} | kwargs))
    engine.bind(model, tok)
    return engine


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_greedy_generate(family):
    model, tok = load_policy(config={"family": family})
    gen = _engine(model, tok).generate(PROMPTS, n=1, greedy=True)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    ref = torch.nn.functional.pad(ref, (0, gen.input_ids.shape[1] - ref.shape[1]), value=tok.pad_token_id)
    real = gen.attention_mask.bool()  # HF keeps sampling past a row's EOS: compare up to it
    assert torch.equal(gen.input_ids[real], ref[real])


def _two_eos_checkpoint(tmp_path, second_eos: int):
    model, tok = load_policy(config={"family": "qwen3_moe"})
    model.generation_config.eos_token_id = [second_eos, tok.eos_token_id]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_policy(str(tmp_path))


def test_every_eos_id_of_the_checkpoint_stops_a_row(tmp_path):
    model, tok = load_policy(config={"family": "qwen3_moe"})
    free = _engine(model, tok).generate(PROMPTS, n=1, greedy=True)
    tokens = free.input_ids[:, free.prompt_len :]
    second = int(tokens[2, 3])  # a token the third row emits at step 3 (and not the tokenizer's EOS)
    assert second != tok.eos_token_id and free.response_mask[2].all()
    model, tok = _two_eos_checkpoint(tmp_path, second)
    engine = _engine(model, tok)
    assert engine.eos_token_ids() == sorted({second, tok.eos_token_id})
    gen = engine.generate(PROMPTS, n=1, greedy=True)
    for row in range(len(PROMPTS)):
        stops = torch.isin(tokens[row], torch.tensor(engine.eos_token_ids())).nonzero()
        length = int(stops[0]) + 1 if len(stops) else tokens.shape[1]
        assert int(gen.response_mask[row].sum()) == length
        assert bool(gen.truncated[row]) == (len(stops) == 0)
        assert torch.equal(gen.input_ids[row, gen.prompt_len :][:length], tokens[row, :length])
    assert int(gen.response_mask[2].sum()) <= 4  # stopped by the second EOS id


def test_eos_ids_from_int_list_or_none_config():
    model, tok = load_policy(config={"family": "qwen3_moe"})
    engine = _engine(model, tok)
    model.generation_config.eos_token_id = 7
    assert engine.eos_token_ids() == [2, 7]
    model.generation_config.eos_token_id = None
    assert engine.eos_token_ids() == [2]


class _BatchSizes:
    """Counts the (batch, seq) of every decoder call."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self.handle = model.get_decoder().register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        self.calls.append(tuple(kwargs["input_ids"].shape))


def test_finished_rows_leave_the_batch_and_the_loop_ends_with_the_last():
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})  # EOS is likely
    engine = _engine(model, tok, max_new_tokens=20)
    counter = _BatchSizes(model)
    torch.manual_seed(1)
    gen = engine.generate(PROMPTS, n=4)
    counter.handle.remove()
    lengths = gen.response_mask.sum(-1)
    assert 0 < int((~gen.truncated).sum()) < 12  # some rows ended early, some did not
    assert counter.calls[0] == (3, gen.prompt_len)  # one prefill per prompt, not per completion
    sizes = [b for b, _ in counter.calls[1:]]
    assert sizes == sorted(sizes, reverse=True)  # the batch only shrinks
    # each row is fed each sampled token but its last: no work past EOS, and the loop stops with the last row
    assert sum(sizes) == int((lengths - 1).sum())
    assert len(sizes) == int(lengths.max()) - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_with_shrinking_batch_equal_a_full_forward(family):
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": family, "vocab_size": 24})
    engine = _engine(model, tok, max_new_tokens=20)
    torch.manual_seed(1)
    gen = engine.generate(PROMPTS, n=4, record_routes=True)
    assert 0 < int((~gen.truncated).sum()) < 12
    with torch.no_grad(), record_routes(model) as rec:
        model(
            gen.input_ids,
            attention_mask=gen.attention_mask,
            position_ids=position_ids_from_mask(gen.attention_mask),
        )
    routed = gen.attention_mask.bool().clone()
    routed[:, -1] = False  # the last position's token is never fed forward
    assert torch.equal(gen.routes >= 0, routed[..., None, None].expand_as(gen.routes))
    same = (gen.routes.sort(-1).values == rec.routes.sort(-1).values).all(-1).all(-1)
    assert bool(same[routed].all())
    assert (
        gen.routes.shape[1] == gen.input_ids.shape[1] == gen.prompt_len + int(gen.response_mask.sum(-1).max())
    )
    prompt = gen.routes[:, : gen.prompt_len].reshape(3, 4, -1)
    assert torch.equal(prompt, prompt[:, :1].expand_as(prompt))  # one shared prefill per group


def test_sampling_is_reproducible_under_manual_seed():
    model, tok = load_policy(config={"family": "qwen3_moe"})
    engine = _engine(model, tok, temperature=0.9, top_p=0.95, top_k=20)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(engine.generate(PROMPTS, n=3))
    assert torch.equal(outs[0].input_ids, outs[1].input_ids) and torch.equal(
        outs[0].infer_logp, outs[1].infer_logp
    )
    assert not torch.equal(outs[0].input_ids, outs[2].input_ids)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_new_tokens", 0, "rollout.engine.max_new_tokens: must be >= 1, got 0"),
        ("temperature", 0.0, "rollout.engine.temperature: must be > 0, got 0.0"),
        ("top_p", 0.0, r"rollout.engine.top_p: must be in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"rollout.engine.top_p: must be in \(0, 1\], got 1.5"),
        ("top_k", -1, "rollout.engine.top_k: must be >= 0, got -1"),
        ("max_prompt_len", 0, "rollout.engine.max_prompt_len: must be >= 1 or None, got 0"),
        ("dtype", "int8", "rollout.engine.dtype: must be 'same' or one of"),
        ("logp_of", "processed", "rollout.engine.logp_of: must be 'sampled' or 'raw', got 'processed'"),
    ],
)
def test_engine_settings_are_validated_at_construction(setting, value, message):
    with pytest.raises(ValueError, match=message):
        HFEngine(**{setting: value})


def test_checkpoint_generation_config_is_ignored_and_said_so(caplog):
    model, tok = load_policy(config={"family": "qwen3_moe"})
    model.generation_config = transformers.GenerationConfig(repetition_penalty=1.3, min_p=0.2, eos_token_id=2)
    with caplog.at_level("INFO", logger="lit_moe_rl.rollout.engine"):
        _engine(model, tok)
    assert (
        "ignoring the checkpoint's generation_config" in caplog.text and "repetition_penalty" in caplog.text
    )


def test_generation_tensors_are_ordinary_tensors_the_trainer_can_backprop_through():
    """The loop runs under inference_mode; what it returns must still be usable under autograd."""
    model, tok = load_policy(config={"family": "qwen3_moe"})
    gen = _engine(model, tok).generate(PROMPTS, n=2, record_routes=True)
    fields = [gen.input_ids, gen.attention_mask, gen.response_mask, gen.infer_logp, gen.truncated, gen.routes]
    assert not any(t.is_inference() for t in fields)
    logp, _, _ = token_logprobs(model, gen.input_ids, gen.attention_mask, gen.prompt_len)
    logp[gen.response_mask].sum().backward()
    assert model.lm_head.weight.grad is not None


def test_right_padded_prompts_are_refused_by_the_loop_and_never_made_by_the_engine():
    model, tok = load_policy(config={"family": "qwen3_moe"})
    tok.padding_side = "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(n=1, max_new_tokens=2, params=SamplingParams(), eos_token_ids=[2], pad_token_id=0)
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        decode(model, enc["input_ids"], enc["attention_mask"], **kwargs)
    gen = _engine(model, tok).generate(PROMPTS, n=1)  # the engine left-pads whatever the tokenizer says
    assert gen.attention_mask[:, gen.prompt_len - 1].all()


@pytest.mark.parametrize("record", [False, True])
def test_output_is_as_long_as_the_longest_response(record):
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})
    torch.manual_seed(1)
    gen = _engine(model, tok, max_new_tokens=200).generate(PROMPTS, n=4, record_routes=record)
    assert not gen.truncated.any()  # every row ended with EOS before max_new_tokens
    assert gen.response_mask.shape[1] == int(gen.response_mask.sum(-1).max())
    assert gen.input_ids.shape[1] == gen.prompt_len + gen.response_mask.shape[1]
    if record:
        assert gen.routes.shape[1] == gen.input_ids.shape[1]


def test_recording_routes_does_not_change_what_is_sampled():
    """Rows fed their EOS once more for R3 are not sampled: R3-on and R3-off draw the same completions
    under one seed (issue 18 item 9: sampling them shifted the random stream, 11 of 12 rows differed)."""
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})  # EOS is likely
    engine = _engine(model, tok, max_new_tokens=20)
    outs = []
    for record in (False, True):
        torch.manual_seed(1)
        outs.append(engine.generate(PROMPTS, n=4, record_routes=record))
    off, on = outs
    assert 0 < int((~off.truncated).sum()) < 12  # rows ended at different steps: some were fed their EOS
    assert torch.equal(off.input_ids, on.input_ids)
    assert torch.equal(off.response_mask, on.response_mask)
    # the forwards hold the EOS rows too, so μ agrees to rounding only (matmuls are not batch-invariant)
    torch.testing.assert_close(off.infer_logp, on.infer_logp, rtol=0, atol=1e-5)


class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values on the host (``tolist``, ``item``, ``bool``, ``nonzero``, ...) made
    outside the decoder's forward: each is a stall on a GPU. Also counts sampled steps (head calls)."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "any_", "numpy"}

    def __init__(self, model):
        super().__init__()
        self.reads, self.inside, self.steps = 0, 0, 0
        decoder = model.get_decoder()
        self.handles = [
            decoder.register_forward_pre_hook(lambda *_: setattr(self, "inside", self.inside + 1)),
            decoder.register_forward_hook(lambda *_: setattr(self, "inside", self.inside - 1)),
            model.get_output_embeddings().register_forward_hook(
                lambda *_: setattr(self, "steps", self.steps + 1)
            ),
        ]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.inside and getattr(func, "__name__", "") in self.READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("record", [False, True])
def test_the_decode_loop_reads_the_device_once_per_step(record):
    """At most one host read per decode step (issue 14 item 9): the loop used about five before."""
    torch.manual_seed(0)
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 24})  # rows end at many steps
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(1)
    with _DeviceReads(model) as reads:
        if record:
            with record_routes(model) as rec:
                out = decode(model, enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=20,
                             params=SamplingParams(), eos_token_ids=[2], pad_token_id=0, recorder=rec)  # fmt: skip
        else:
            out = decode(model, enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=20,
                         params=SamplingParams(), eos_token_ids=[2], pad_token_id=0)  # fmt: skip
    for handle in reads.handles:
        handle.remove()
    assert reads.steps == out.tokens.shape[1] >= 5
    assert reads.reads <= reads.steps + 2  # one per step; at the start the prompt mask's one read (left
    # padding, any padding) and the prefill's index of real tokens in that host copy (no device read)
