"""Generation memory at a real vocabulary (151,936) does not grow with the response length.

Peak RSS is read in a fresh subprocess (``ru_maxrss``) after a short and then a long generation.
The long one may only add its KV cache and route/token buffers (well under a MiB here); keeping one
``[N, V]`` fp32 tensor per decode step, as ``generate(output_logits=True)`` does, adds about
3.5 x N x R x V x 4 bytes: measured +492 MiB for the lengths below (+0.4 MiB now).
"""

from __future__ import annotations

from helpers import peak_rss_mib

SCRIPT = """
import resource, torch
torch.set_num_threads(1)
from lit_moe_rl.policy import load_policy
from lit_moe_rl.rollout.engine import HFEngine
model, tok = load_policy(config={"family": "qwen3_moe", "vocab_size": 151936, "hidden_size": 64})
# random weights: the only EOS (the char tokenizer's, id 2) is ~1/151936 likely per step
model.generation_config.eos_token_id = None
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
prompts = ["3 5 7 => 22 =", "1 2 => 3 ="]
for length in (4, 4, 64):
    engine = HFEngine(max_new_tokens=length)
    engine.bind(model, tok)
    torch.manual_seed(0)
    gen = engine.generate(prompts, n=2)
    assert gen.response_mask.shape[1] == length, gen.response_mask.shape
    print(length, peak_mib(), flush=True)
"""


def test_generation_peak_memory_does_not_grow_with_response_length():
    peaks = peak_rss_mib(SCRIPT)
    short, long = peaks[1], peaks[2]
    # 4 rows x 60 more steps x V x 4 bytes = 139 MiB for one copy of the per-step logits
    assert long - short < 40, f"peak RSS grew by {long - short:.0f} MiB from 4 to 64 new tokens"
