"""Is the training forward a function of the sequence alone? R3 §3.3's batch-composition check.

Ma et al. (arXiv 2510.11370, §3.3) run the same sequences through the training engine twice and find a
KL of 8.4e-4 between the two passes: kernels whose reduction order depends on the batch (its size, its
padding, its partners) change the log-probs, and in an MoE a tiny change can flip a top-K choice. A
stack with such noise has a train-inference mismatch even with identical weights and engines, and R3
cannot remove that part. :func:`composition_kl` measures it for any model: the same rows scored once
in one batch and once in shuffled micro-batches, compared with the estimators of the mismatch metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_moe_rl.metrics import extreme_token_fraction, train_infer_kl
from lit_moe_rl.policy import token_logprobs


@torch.no_grad()
def composition_kl(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    prompt_len: int,
    *,
    micro_batch_size: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """KL (R3 Eq. 2) and F(τ=2) (Eq. 3) between two forwards of the same rows in different batches.

    Pass A scores all ``N`` rows ``[N, P+R]`` in one batch; pass B scores them in a random order
    (``seed``), ``micro_batch_size`` rows at a time. Both use the same weights, padding and position
    ids, so in exact arithmetic they are equal; the returned ``kl`` is the k3 estimate over the
    response tokens of ``response_mask [N, R]``, with B in the role of the trainer and A of the
    engine, and ``logp_absdiff_max`` the largest per-token difference.
    """
    if micro_batch_size < 1:
        raise ValueError(f"composition_kl: micro_batch_size must be >= 1, got {micro_batch_size}")
    was_training = model.training
    model.eval()
    try:
        whole, _, _ = token_logprobs(model, input_ids, attention_mask, prompt_len, temperature=temperature)
        order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
        parts = torch.empty_like(whole)
        for rows in order.to(input_ids.device).split(micro_batch_size):
            parts[rows], _, _ = token_logprobs(
                model, input_ids[rows], attention_mask[rows], prompt_len, temperature=temperature
            )
    finally:
        model.train(was_training)
    mask = response_mask.bool()
    diff = (parts - whole).abs().masked_fill(~mask, 0.0)
    return {
        "kl": float(train_infer_kl(parts.float(), whole.float(), mask)),
        "extreme_frac_tau2": float(extreme_token_fraction(parts.float(), whole.float(), mask, 2.0)),
        "logp_absdiff_max": float(diff.max()),
        "tokens": int(mask.sum()),
    }
