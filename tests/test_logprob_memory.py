"""Training log-prob memory at a real vocabulary (151,936) does not grow with batch x response length.

``token_logprobs`` runs the LM head on at most ``chunk_size`` response tokens at a time, across rows,
so the fp32 logits alive at once are ``[chunk_size, V]`` however many rows and positions a micro-batch
holds. Peak RSS is read in a fresh subprocess (``ru_maxrss``) after forward + backward on 2 x 256 and
then 16 x 256 response tokens (both fill whole chunks). Chunking by positions alone (the old layout) keeps ``[16, 256, V]``
fp32 logits, 2.3 GiB, in one chunk; the token chunk of 256 is 148 MiB.
"""

from __future__ import annotations

from helpers import peak_rss_mib

SCRIPT = """
import resource, torch
torch.set_num_threads(1)
from lit_moe_rl.policy import load_policy, token_logprobs
model, _ = load_policy(config={"family": "qwen3_moe", "vocab_size": 151936, "hidden_size": 64,
                               "num_hidden_layers": 1})
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
for rows, length in ((2, 256), (2, 256), (16, 256)):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 151936, (rows, 8 + length), generator=g)
    attn = torch.ones_like(ids)
    attn[0, 8 + length // 2 :] = 0  # one row right-padded
    logp, _, _ = token_logprobs(model, ids, attn, 8, chunk_size=256)
    logp.sum().backward()
    assert logp.shape == (rows, length)
    model.zero_grad(set_to_none=True)
    print(rows * length, peak_mib(), flush=True)
"""


def test_logprob_peak_memory_does_not_grow_with_batch_times_response():
    peaks = peak_rss_mib(SCRIPT)
    small, large = peaks[1], peaks[2]
    # 8x more tokens; one more [256, V] fp32 chunk alone would be +148 MiB
    assert large - small < 120, f"peak RSS grew by {large - small:.0f} MiB from 512 to 4096 response tokens"
