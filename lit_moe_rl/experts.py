"""``model.experts_implementation``: the experts kernel the policy trains and samples with.

Transformers dispatches every MoE family's experts (the ``@use_experts_implementation`` classes)
through one interface; its default, ``grouped_mm``, sorts the ``S = T * K`` (token, expert) pairs by
expert, runs one grouped matmul per projection and restores the token order. It moves rows with
advanced indexing (``hidden_states[perm // K]``, ``weighted_out[inv_perm]``), and the backward of
advanced indexing is an accumulating ``index_put_``: on CPU that was 13% of a training forward and
backward (a tiny Qwen3-MoE, 32 x 100 tokens; ``aten::_index_put_impl_`` at 3.3 ms a call).

:func:`scatter_free_experts_forward` (registered as ``lit_grouped_mm``) is the same computation with
every row move written as a gather by a permutation (``index_select``), whose backward is a
scatter-add of each row once: the hidden states are repeated ``K`` times first (backward: a sum over
the ``K`` copies) and then permuted. The forward does the same arithmetic on the same rows in the same
order, so logits are bitwise equal to ``grouped_mm``'s; gradients are bitwise equal at ``K = 2`` and
differ in the order of the ``K`` additions into a token's hidden-state gradient above that (rounding).
The grouped matmul itself is transformers' own dispatch (``torch.nn.functional.grouped_mm`` where the
device and dtype have it, its looped fallback otherwise, and under ``torch.compile``).

Inside :func:`real_tokens_only` (the trainer's forwards, :func:`lit_moe_rl.policy.token_logprobs`) the
kernel skips padding tokens: a GRPO micro-batch pads every response to its longest (about 30% of
the response tokens at ``bench/vs_trl.py``'s shape), and the experts are most of a training forward.

``auto`` (the default) switches a policy whose experts use ``grouped_mm`` to this kernel and leaves
any other choice (a checkpoint's own ``experts_implementation``, a family outside the interface)
alone; any other value is handed to transformers' ``set_experts_implementation`` (``eager``,
``grouped_mm``, ``batched_mm``, ...). The rollout engine runs the policy's own kernel, so sampling
and training use the same one.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lit_moe_rl.errors import SettingsError

__all__ = [
    "KERNEL",
    "SETTING",
    "apply_experts_implementation",
    "check_experts_implementation",
    "real_tokens_only",
    "scatter_free_experts_forward",
]

KERNEL = "lit_grouped_mm"
SETTING = "model.experts_implementation"


_GROUPED_LINEAR: Any = None  # transformers' grouped linear, once looked up (_grouped_linear)


def _grouped_linear() -> Any:
    """Transformers' grouped linear (its kernel dispatch and fallbacks), or None where it has none; looked
    up once, not in every experts call. A plain global, not ``functools.cache``: ``torch.compile`` warns
    about a call to a cached function inside a compiled region."""
    global _GROUPED_LINEAR
    if _GROUPED_LINEAR is None:
        try:
            from transformers.integrations.moe import _grouped_linear as grouped_linear
        except ImportError:
            return None
        _GROUPED_LINEAR = grouped_linear
    return _GROUPED_LINEAR


_REAL_TOKENS: contextvars.ContextVar[tuple[int, Tensor] | None] = contextvars.ContextVar(
    "lit_moe_rl_real_tokens", default=None
)


@contextlib.contextmanager
def real_tokens_only(attention_mask: Tensor | None) -> Iterator[None]:
    """Within, :func:`scatter_free_experts_forward` computes the experts only for the tokens where
    ``attention_mask [B, S]`` (the one decoder call's ``B x S`` tokens) is 1; padding tokens get a zero
    experts output. ``None``: every token, as outside.

    Exact for every real token: a padding token's hidden state reaches no real token (its key is masked
    in every attention, and a response's right padding comes after it) and no loss, so what the experts
    add to it changes nothing, forward or backward. The router still runs on every token, so R3 replay,
    routes, router logits and the aux loss see the same ``[B, S]`` layout; their values at padding
    positions differ after the first MoE layer, and every reader masks padding (the aux loss takes the
    attention mask; routing and RSPO metrics read real tokens). A call whose token count is not ``B x S``
    (another forward) computes every token."""
    keep = None
    if attention_mask is not None:
        where = attention_mask.reshape(-1).nonzero().squeeze(-1)
        keep = None if where.numel() == attention_mask.numel() else (attention_mask.numel(), where)
    token = _REAL_TOKENS.set(keep)
    try:
        yield
    finally:
        _REAL_TOKENS.reset(token)


def _real_token_rows(num_tokens: int) -> Tensor | None:
    """The rows of the real tokens when this call is the one :func:`real_tokens_only` masks, else None
    (always under ``torch.compile``: reading the context would break the graph, and the learner's
    compiled update computes every token)."""
    if torch.compiler.is_compiling():
        return None
    keep = _REAL_TOKENS.get()
    return keep[1] if keep is not None and keep[0] == num_tokens else None


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for a 1-D ``index``, as a gather whose backward is a scatter-add, not ``index_put_``."""
    return x.index_select(0, index)


def scatter_free_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The routed experts' output ``sum_k w_k * E_{i_k}(x)`` for each token (the MoE layer's sum over
    its top-``K`` experts), as transformers' ``grouped_mm_experts_forward`` computes it, with row moves
    as permutation gathers (module docstring); inside :func:`real_tokens_only`, zeros for padding tokens.
    ``hidden_states`` is ``[T, H]``, ``top_k_index`` and ``top_k_weights`` are ``[T, K]``; called as a
    method of the experts module."""
    if getattr(self, "_is_expert_parallel", False):  # other ranks' experts are sentinel rows there
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    real = _real_token_rows(hidden_states.shape[0])
    if real is not None:  # padding tokens get no experts (real_tokens_only)
        real = real.to(hidden_states.device)
        rows = (_gather_rows(t, real) for t in (hidden_states, top_k_index, top_k_weights))
        out = _routed_experts(self, *rows)
        return out.new_zeros(hidden_states.shape).index_copy(0, real, out)
    return _routed_experts(self, hidden_states, top_k_index, top_k_weights)


def _routed_experts(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """:func:`scatter_free_experts_forward` on every token it is given."""
    grouped_linear = _grouped_linear()
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.size(-1)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))  # (S,): the pairs grouped by expert
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    # Per-expert row counts as transformers counts them (histc: graph-capturable; float on CPU/MPS).
    counts_in = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(counts_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    repeated = hidden_states.unsqueeze(1).expand(num_tokens, top_k, hidden_dim).reshape(-1, hidden_dim)
    x_g = _gather_rows(repeated, perm)  # (S, H): row s is the token of pair perm[s]
    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = None
    if self.has_bias:
        up_bias = _gather_rows(self.gate_up_proj_bias if self.has_gate else self.up_proj_bias, expert_ids_g)
    proj = grouped_linear(x_g, up_weight, offsets, bias=up_bias, is_transposed=self.is_transposed)
    proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)
    down_bias = _gather_rows(self.down_proj_bias, expert_ids_g) if self.has_bias else None
    proj = grouped_linear(proj, self.down_proj, offsets, bias=down_bias, is_transposed=self.is_transposed)
    if self.has_post_expert_norm:
        proj = self.post_expert_norm(proj)
    weighted = proj * _gather_rows(top_k_weights.reshape(-1), perm).unsqueeze(-1)  # (S, H)
    out = _gather_rows(weighted, inv_perm).view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Register :data:`KERNEL` with transformers' experts interface (idempotent); False where this
    transformers has no grouped linear to build it on."""
    if _grouped_linear() is None:
        return False
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if KERNEL not in ALL_EXPERTS_FUNCTIONS.valid_keys():
        ALL_EXPERTS_FUNCTIONS.register(KERNEL, scatter_free_experts_forward)
    return True


def known_implementations() -> list[str]:
    """``auto`` and every experts implementation transformers has registered (this kernel included)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    register()
    return ["auto", "eager", *sorted(k for k in ALL_EXPERTS_FUNCTIONS.valid_keys() if k != "eager")]


def check_experts_implementation(value: Any, setting: str = SETTING) -> None:
    """Refuse an unknown kernel name in one line, before any model loads."""
    known = known_implementations()
    if value not in known:
        raise SettingsError(f"{setting}: unknown {value!r}; choose one of {', '.join(known)}")


def current_implementation(model: nn.Module) -> str | None:
    """The experts implementation ``model`` dispatches to, or None for a model outside the interface."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        return None
    return getattr(model.config, "_experts_implementation", None) or "eager"


def apply_experts_implementation(model: nn.Module, value: str = "auto", setting: str = SETTING) -> str | None:
    """Set ``model``'s experts kernel from ``value`` (module docstring) and return the one it now uses
    (None: the model has no experts interface). A value transformers refuses is a one-line error naming
    ``setting``."""
    current = current_implementation(model)
    if value == "auto":
        if current == "grouped_mm" and register():
            model.set_experts_implementation(KERNEL)
            return KERNEL
        return current
    if current is None:
        raise ValueError(f"{setting}: {type(model).__name__} has no experts interface to set {value!r} on")
    if value == KERNEL and not register():
        raise ValueError(f"{setting}: {KERNEL} needs transformers' grouped_mm experts (transformers >= 5)")
    try:
        model.set_experts_implementation(value)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{setting}: {value!r} was refused: {str(err).splitlines()[0]}") from None
    return current_implementation(model)
