"""Pure sampling math of the rollout engine, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moe_rl.rollout.sampling import (
    SamplingParams,
    sample_step,
    temper,
    token_logp,
    top_k_filter,
    top_p_filter,
    truncate,
)

INF = float("-inf")


def test_temper_divides_in_float32():
    logits = torch.tensor([[2.0, -1.0]], dtype=torch.bfloat16)
    out = temper(logits, 0.5)
    assert out.dtype == torch.float32 and out.tolist() == [[4.0, -2.0]]


def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 1.0]])
    assert top_k_filter(logits, 2).tolist() == [[INF, 3.0, 2.0, INF], [5.0, 5.0, 5.0, INF]]
    assert torch.equal(top_k_filter(logits, 0), logits)  # off
    assert torch.equal(top_k_filter(logits, 4), logits)  # k >= V keeps all


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05 (in a shuffled order): mass before each = 0, 0.5, 0.8, 0.95
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [[False, True, False, True]]
    assert top_p_filter(logits, 0.8).isfinite().tolist() == [[False, True, False, True]]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, True, False, True]]
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [[False, True, False, False]]  # >= 1 token
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_truncate_applies_top_k_before_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-k 3 renormalises to 4/9, 3/9, 2/9: mass before = 0, 0.44, 0.78 -> top-p 0.7 keeps two
    assert truncate(logits, 3, 0.7).isfinite().tolist() == [[True, True, False, False]]
    # top-p alone on 0.4, 0.3, 0.2, 0.1: mass before 0, 0.4, 0.7 -> keeps three at p = 0.71
    assert truncate(logits, 0, 0.71).isfinite().tolist() == [[True, True, True, False]]


def test_token_logp_is_the_log_softmax_at_the_token():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, INF]])
    assert torch.allclose(token_logp(logits, torch.tensor([1, 0])), torch.tensor([math.log(0.75), 0.0]))


def test_sample_step_logp_of_sampled_or_raw():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(2000, 1)
    torch.manual_seed(0)
    tokens, sampled = sample_step(logits, SamplingParams(top_k=2, logp_of="sampled"))
    assert set(tokens.tolist()) == {0, 1}  # only the top-2 are ever drawn
    expected = torch.tensor([4 / 7, 3 / 7]).log()[tokens]
    assert torch.allclose(sampled, expected)  # renormalised over what was kept
    torch.manual_seed(0)
    tokens_raw, raw = sample_step(logits, SamplingParams(top_k=2, logp_of="raw"))
    assert torch.equal(tokens_raw, tokens)  # the same draws: only the reported μ differs
    assert torch.allclose(raw, torch.tensor([0.4, 0.3]).log()[tokens])
    assert abs((tokens == 0).float().mean().item() - 4 / 7) < 0.04


def test_greedy_takes_the_argmax_with_its_tempered_logp():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    tokens, logp = sample_step(logits, SamplingParams(temperature=0.5, top_k=1, greedy=True))
    assert tokens.tolist() == [1]
    assert torch.allclose(logp, torch.log_softmax(logits / 0.5, -1)[:, 1])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, top_k=5)])
def test_sampling_is_deterministic_under_manual_seed(params):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    a = sample_step(logits, params)
    torch.manual_seed(3)
    b = sample_step(logits, params)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "bad_row",
    [[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0], [float("-inf")] * 3],
    ids=["nan", "inf", "all-masked"],
)
def test_non_finite_probabilities_fail_in_one_line_before_multinomial(bad_row):
    """On CUDA ``torch.multinomial`` asserts on the device for such a row and kills the CUDA context."""
    from lit_moe_rl.rollout.sampling import NonFiniteProbabilities

    logits = torch.tensor([[0.0, 1.0, 2.0], bad_row, [2.0, 1.0, 0.0]])
    with pytest.raises(NonFiniteProbabilities, match=r"NaN or inf in 1 of 3 rows") as err:
        sample_step(logits, SamplingParams())
    assert "\n" not in str(err.value)


def test_engine_on_nan_weights_raises_before_sampling():
    from lit_moe_rl.policy import load_policy
    from lit_moe_rl.rollout.engine import HFEngine
    from lit_moe_rl.rollout.sampling import NonFiniteProbabilities

    torch.manual_seed(0)
    policy, tokenizer = load_policy(None, {"family": "qwen3_moe"})
    with torch.no_grad():
        policy.get_output_embeddings().weight[5].fill_(float("nan"))
    engine = HFEngine(max_new_tokens=4)
    engine.bind(policy, tokenizer)
    with pytest.raises(NonFiniteProbabilities):
        engine.generate(["4 9 => 13 ="], n=2)


def test_flagged_step_marks_exactly_the_non_finite_rows_and_draws_the_others():
    """``bad`` comes from each row's logsumexp: NaN, +inf and all -inf rows, and no finite row, even one
    with -inf entries (masked tokens) or logits far from 0."""
    from lit_moe_rl.rollout.sampling import sample_step_flagged

    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 1.0, 2.0], [nan, 0.0, 1.0], [inf, 0.0, 1.0], [-inf, -inf, -inf],
                           [-inf, 3.0, -inf], [1e4, 1e4 - 1.0, -1e4]])  # fmt: skip
    torch.manual_seed(0)
    tokens, logp, bad = sample_step_flagged(logits, SamplingParams())
    assert bad.tolist() == [False, True, True, True, False, False]
    assert tokens[4] == 1 and logp[4] == 0.0  # the one unmasked token, probability 1
    good = ~bad
    expected = torch.log_softmax(logits[good], -1).gather(-1, tokens[good, None]).squeeze(-1)
    torch.testing.assert_close(logp[good], expected)
    assert ((tokens >= 0) & (tokens < 3)).all()  # bad rows drew from the uniform stand-in


def test_draw_samples_the_distribution_and_never_a_zero_probability_token():
    """Inverse transform sampling: the frequencies of 200,000 draws match the probabilities (3 sigma),
    whatever the rows' totals, and a token of probability 0 (first, middle or last) is never drawn."""
    from lit_moe_rl.rollout.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0, 1.0]])  # row 2 sums to 4
    torch.manual_seed(0)
    tokens, totals = draw(probs.repeat_interleave(100_000, 0))
    assert totals[[0, -1]].tolist() == pytest.approx(
        [1.0, 4.0], rel=1e-7
    )  # each row's mass (float32 0.2 etc.)
    tokens = tokens.view(2, -1)
    for row, drawn in zip(probs, tokens, strict=True):
        freq = torch.bincount(drawn, minlength=6).double() / drawn.numel()
        p = (row / row.sum()).double()
        sigma = (p * (1 - p) / drawn.numel()).sqrt()
        assert ((freq - p).abs() <= 3 * sigma + 1e-12).all(), (freq, p)
        assert (freq[p == 0] == 0).all()


def test_draw_is_exact_at_the_real_vocabulary_in_row_chunks(monkeypatch):
    """At V = 151,936 the rows are summed in chunks (32 MiB of float64 each: 27 rows); a chunk boundary
    changes nothing, and a row whose whole mass sits on its last token always draws it."""
    from lit_moe_rl.rollout import sampling

    vocab = 151_936
    probs = torch.rand(40, vocab, generator=torch.Generator().manual_seed(0))
    probs[7] = 0.0
    probs[7, -1] = 1e-30  # tiny but the only mass: float64 sums keep it
    torch.manual_seed(1)
    chunked, totals = sampling.draw(probs)
    monkeypatch.setattr(sampling, "CDF_CHUNK_BYTES", 1 << 40)  # one chunk
    torch.manual_seed(1)
    whole, whole_totals = sampling.draw(probs)
    assert torch.equal(whole, chunked) and torch.equal(whole_totals, totals)
    assert chunked[7] == vocab - 1 and totals[7] == probs[7, -1].double()  # the one term, exactly
