"""composition_kl (R3 §3.3): zero for a batch-invariant forward, the hand-worked KL for one that is not."""

import math

import pytest
import torch
from torch import nn

from lit_moe_rl.nondeterminism import composition_kl
from lit_moe_rl.policy import load_policy


def _tiny():
    model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 32}, dtype="float32")
    return model, tok


def _batch(n=6, prompt_len=4, response_len=5, vocab=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, prompt_len + response_len), generator=g)
    attention = torch.ones_like(ids)
    response = torch.ones(n, response_len, dtype=torch.bool)
    response[0, 3:] = False  # a row that ended early: its tail is not scored
    return ids, attention, response, prompt_len


class BatchSizeShift(nn.Module):
    """An LM head whose logit of token 5 grows by ``shift`` per token it sees beyond one row's five
    (``token_logprobs`` hands the head ``[tokens, H]``, flattened across rows)."""

    def __init__(self, head: nn.Module, shift: float) -> None:
        super().__init__()
        self.head, self.shift = head, shift

    def forward(self, hidden):
        logits = self.head(hidden)
        bump = torch.zeros(logits.shape[-1])
        bump[5] = self.shift * (hidden.shape[0] - 5)
        return logits + bump


def test_a_batch_invariant_forward_has_no_composition_kl():
    model, _ = _tiny()
    ids, attention, response, p = _batch()
    out = composition_kl(model, ids, attention, response, p, micro_batch_size=2)
    assert out["kl"] < 1e-10 and out["extreme_frac_tau2"] == 0.0 and out["logp_absdiff_max"] < 1e-4
    assert out["tokens"] == int(response.sum())


def test_composition_kl_equals_the_k3_estimate_of_a_known_shift():
    model, _ = _tiny()
    ids, attention, response, p = _batch()
    ids[:, p:] = 7  # every response token is 7, never the shifted token 5
    head = model.get_output_embeddings()
    model.set_output_embeddings(BatchSizeShift(head, shift=0.1))
    out = composition_kl(model, ids, attention, response, p, micro_batch_size=1)
    # one batch of 6 rows x 5 tokens shifts token 5's logit by 0.1 x 25 = 2.5, one row by 0: log p(7) differs by
    # log(Z_whole / Z_single), where Z_whole = Z_single + p5 * (e^2.5 - 1) in units of Z_single.
    model.set_output_embeddings(head)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, p - 1 : -1].float()
    p5 = logits.softmax(-1)[..., 5]  # [N, R]
    log_r = torch.log1p(p5 * (math.exp(2.5) - 1))  # log(pi_parts / pi_whole) per token
    k3 = (torch.expm1(log_r) - log_r)[response].mean()
    assert out["kl"] == pytest.approx(float(k3), rel=1e-4)
    assert out["logp_absdiff_max"] == pytest.approx(float(log_r[response].max()), rel=1e-4)


def test_micro_batch_size_is_validated():
    model, _ = _tiny()
    ids, attention, response, p = _batch()
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        composition_kl(model, ids, attention, response, p, micro_batch_size=0)
