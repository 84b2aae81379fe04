"""μ is the distribution actually sampled from, even when the checkpoint's generation_config says otherwise.

The first response token of many completions of one prompt is an i.i.d. sample of one distribution,
and ``exp(infer_logp)`` of each draw reports that distribution's probability of the drawn token, so
the empirical frequencies can be checked against μ with a chi-square statistic. The checkpoint sets
``repetition_penalty`` and ``min_p``: an engine that lets ``generate`` apply them samples from
another distribution than the μ it reports, and fails here (statistic in the thousands).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout.engine import HFEngine

DRAWS = 6000
CRITICAL = 120.0  # chi-square, at most 63 degrees of freedom: P(X > 120) < 1e-5


def _checkpoint_with_modifiers(tmp_path):
    model, tok = load_policy(config={"family": "qwen3_moe", "hidden_size": 64}, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a peaked next-token distribution, so min_p cuts something
    model.generation_config = transformers.GenerationConfig(
        repetition_penalty=1.3, min_p=0.3, no_repeat_ngram_size=1, eos_token_id=2, do_sample=True
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_policy(str(tmp_path))


def _first_tokens(engine, prompt):
    torch.manual_seed(0)
    gen = engine.generate([prompt], n=DRAWS)
    return gen.input_ids[:, gen.prompt_len], gen.infer_logp[:, 0]


def _chi_square(tokens, logp, vocab):
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[tokens] = logp.double().exp()  # every draw of a token reports the same probability
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = probs * len(tokens)
    big = expected >= 5
    rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
    stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
    return float(stat), probs


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=8, top_p=0.9, logp_of="sampled"),
    ],
)
def test_sampled_frequencies_match_exp_mu(tmp_path, settings):
    model, tok = _checkpoint_with_modifiers(tmp_path)
    engine = HFEngine(max_new_tokens=1, **settings)
    engine.bind(model, tok)
    prompt = "3 3 3 3 3 => 15 ="
    tokens, logp = _first_tokens(engine, prompt)
    stat, probs = _chi_square(tokens, logp, model.config.vocab_size)
    assert stat < CRITICAL
    assert abs(float(probs.sum()) - 1.0) < 0.02  # the drawn tokens carry (almost) all of μ's mass
    # the checkpoint's modifiers would have mattered: generate() with them samples far from μ
    assert _total_variation(probs, _generate_distribution(model, tok, prompt, settings)) > 0.1


def _generate_distribution(model, tok, prompt, settings):
    """The next-token distribution ``model.generate`` samples from with the checkpoint's generation_config."""
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    sampling = {k: settings.get(k, d) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))}
    out = model.generate(
        **enc, max_new_tokens=1, do_sample=True, output_scores=True, return_dict_in_generate=True, **sampling
    )
    return out.scores[0][0].double().softmax(-1)


def _total_variation(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_raw_mu_is_the_untruncated_tempered_distribution(tmp_path):
    model, tok = _checkpoint_with_modifiers(tmp_path)
    prompt = "3 3 3 3 3 => 15 ="
    engines = {}
    for logp_of in ("sampled", "raw"):
        engines[logp_of] = HFEngine(max_new_tokens=1, temperature=0.7, top_k=3, logp_of=logp_of)
        engines[logp_of].bind(model, tok)
    tokens, sampled = _first_tokens(engines["sampled"], prompt)
    tokens_raw, raw = _first_tokens(engines["raw"], prompt)
    assert torch.equal(tokens, tokens_raw) and len(tokens.unique()) == 3
    # raw μ is lower by the log of the kept mass, the same for every draw
    gap = sampled - raw
    assert float(gap.min()) > 0 and torch.allclose(gap, gap[:1].expand_as(gap))
    kept = float(raw.exp().unique().sum())
    assert abs(float(gap[0]) + torch.tensor(kept).log()) < 1e-4
