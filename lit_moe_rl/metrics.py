"""Train/inference mismatch metrics (Ma et al., R3, arXiv 2510.11370 §3.2; docs/algorithms.md §3.2).

Per-token inputs are ``[B, T]`` with a bool ``mask``; routes are integer ``[N, T, L, K]`` expert
ids with ``-1`` for "no route". Every result is a detached tensor (0-dim unless stated) on the
inputs' device, so logging it does not force a device sync. Garbage at masked positions never leaks
(``torch.where``, never multiplication), and an empty selection gives zeros, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_moe_rl.losses import masked_mean

_CHUNK_TOKENS = 8192  # routing_agreement compares at most this many tokens at once (bounds memory)


def log_ratio(train_logp: Tensor, infer_logp: Tensor, mask: Tensor, *, what: str = "metrics") -> Tensor:
    """Detached float32 ``log r = log pi_train - log pi_infer``, 0 at masked positions."""
    if not train_logp.shape == infer_logp.shape == mask.shape:
        raise ValueError(
            f"{what}: shapes differ: train_logp {tuple(train_logp.shape)}, "
            f"infer_logp {tuple(infer_logp.shape)}, mask {tuple(mask.shape)}"
        )
    diff = train_logp.detach().float() - infer_logp.detach().float()
    return torch.where(mask, diff, 0.0)


def train_infer_kl(train_logp: Tensor, infer_logp: Tensor, mask: Tensor) -> Tensor:
    """Train-inference KL estimate, R3 paper Eq. 2: ``mean_t [r_t - 1 - log r_t]``, ``r = pi_train/pi_infer``.

    This is the k3 estimator (= verl/MIS "vllm-kl"). The tokens are sampled from the inference
    policy mu, so it estimates ``KL(mu || pi_train)``, although the paper writes D_KL(pi_train; pi_infer).
    Choice: ``log r`` is clamped to [-20, 20] so one degenerate token cannot produce inf.
    """
    log_r = log_ratio(train_logp, infer_logp, mask).clamp(-20.0, 20.0)
    return masked_mean(torch.expm1(log_r) - log_r, mask)


def extreme_token_fraction(train_logp: Tensor, infer_logp: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Extreme token distribution function, R3 paper Eq. 3: ``F(tau) = mean_t 1[max(r_t, 1/r_t) > tau]``.

    Evaluated in log space as ``|log r| > log tau`` (strict: a ratio of exactly tau is not extreme).
    """
    if not tau > 1:
        raise ValueError(f"metrics: tau must be > 1, got {tau}")
    log_r = log_ratio(train_logp, infer_logp, mask)
    return masked_mean((log_r.abs() > math.log(tau)).float(), mask)


def logp_diff_stats(train_logp: Tensor, infer_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Mean and max of ``|log pi_train - log pi_infer|`` over valid tokens (both 0 when empty)."""
    absdiff = log_ratio(train_logp, infer_logp, mask).abs()
    return {"logp_absdiff_mean": masked_mean(absdiff, mask), "logp_absdiff_max": absdiff.amax()}


def _routed_tokens(routes: Tensor, valid: Tensor | None) -> Tensor:
    """Bool ``[N, T]``: tokens with no ``-1`` in any layer or slot, restricted by ``valid``."""
    ok = (routes >= 0).flatten(-2).all(dim=-1)
    if valid is not None:
        if valid.shape != ok.shape:
            raise ValueError(f"metrics: valid has shape {tuple(valid.shape)}, routes need {tuple(ok.shape)}")
        ok = ok & valid.to(device=ok.device, dtype=torch.bool)
    return ok


def _compare_chunk(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """For ``[m, L, K]`` ids: (set differs ``[m, L]`` bool, intersection size ``[m, L]`` long)."""
    differ = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).sum(dim=(-2, -1))
    return differ, inter


def routing_agreement(routes_a: Tensor, routes_b: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Routing discrepancy between two routings of the same tokens, R3 paper §3.2.

    ``routes_a``/``routes_b``: integer ``[N, T, L, K]`` (any int dtype), ``-1`` = no route. A token is
    compared only if neither side has a ``-1`` anywhere in it and ``valid`` (bool ``[N, T]``) allows
    it. Expert *sets* are compared per (token, layer), order-insensitively (sorted along K); the
    paper's unclear counting unit (docs/algorithms.md §3.2) is read as "per router".

    Returns detached float32 scalars: ``router_disagreement`` (fraction of (token, layer) pairs with
    a different set), ``token_disagreement`` (fraction of tokens with >= 1 differing layer),
    ``routers_differing_per_token`` (mean number of differing layers per token), ``overlap_at_k/<l>``
    (mean ``|A ∩ B| / K`` at layer l), ``overlap_at_k`` (its mean over layers) and ``tokens`` (number
    of tokens compared). ``|A ∩ B|`` counts equal (a_k, b_k') pairs, exact because the ids of one
    token and layer are distinct by construction. With no token compared, every value is 0.
    Tokens are processed in chunks so memory stays bounded on long rollouts.
    """
    if routes_a.shape != routes_b.shape or routes_a.dim() != 4:
        raise ValueError(
            f"metrics: routes must both be [N, T, L, K], got {tuple(routes_a.shape)} and {tuple(routes_b.shape)}"
        )
    ok = _routed_tokens(routes_a, valid) & _routed_tokens(routes_b, valid)
    a, b = routes_a[ok], routes_b.to(routes_a.device)[ok]
    num_tokens, num_layers, k = a.shape
    differ_per_token = torch.zeros(num_tokens, dtype=torch.long, device=a.device)
    inter_per_layer = torch.zeros(num_layers, dtype=torch.long, device=a.device)
    for start in range(0, num_tokens, _CHUNK_TOKENS):
        end = start + _CHUNK_TOKENS
        differ, inter = _compare_chunk(a[start:end], b[start:end])
        differ_per_token[start:end] = differ.sum(dim=-1)
        inter_per_layer += inter.sum(dim=0)
    denom = float(max(num_tokens, 1))
    overlap = inter_per_layer.double() / (denom * k)
    out = {
        "router_disagreement": differ_per_token.sum().double() / (denom * num_layers),
        "token_disagreement": (differ_per_token > 0).sum().double() / denom,
        "routers_differing_per_token": differ_per_token.sum().double() / denom,
        "overlap_at_k": overlap.mean() if num_layers else overlap.sum(),
        **{f"overlap_at_k/{layer}": overlap[layer] for layer in range(num_layers)},
        "tokens": torch.tensor(float(num_tokens), dtype=torch.float64, device=a.device),
    }
    return {name: value.float() for name, value in out.items()}


def expert_load_entropy(routes: Tensor, num_experts: int, valid: Tensor | None = None) -> Tensor:
    """Normalised entropy of each layer's expert-selection histogram, float32 ``[L]``.

    Counts every routed (token, slot) entry of layer l (entries ``< 0`` ignored, tokens restricted by
    ``valid`` bool ``[N, T]``), forms the empirical distribution p_l over ``num_experts`` experts and
    returns ``H(p_l) / log(num_experts)`` in nats / nats: 1.0 = perfectly balanced load, 0.0 = one
    expert takes everything. A layer with no routed entry gets 0. Not a paper equation: a standard
    load-balance diagnostic.
    """
    if num_experts < 2:
        raise ValueError(f"metrics: num_experts must be >= 2, got {num_experts}")
    if routes.dim() != 4:
        raise ValueError(f"metrics: routes must be [N, T, L, K], got {tuple(routes.shape)}")
    keep = routes >= 0
    if valid is not None:
        keep = keep & valid.to(device=routes.device, dtype=torch.bool)[..., None, None]
    if keep.any() and int(routes[keep].max()) >= num_experts:
        raise ValueError(f"metrics: expert id {int(routes[keep].max())} >= num_experts={num_experts}")
    counts = torch.zeros(routes.shape[2], num_experts, dtype=torch.float64, device=routes.device)
    for layer in range(routes.shape[2]):
        ids = routes[..., layer, :][keep[..., layer, :]].long()
        counts[layer] = torch.bincount(ids, minlength=num_experts).double()
    p = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    plogp = torch.where(p > 0, p * p.clamp(min=1e-300).log(), 0.0)
    return (-plogp.sum(dim=-1) / math.log(num_experts)).float()
