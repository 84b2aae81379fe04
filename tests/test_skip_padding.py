"""Padding tokens skip the experts (``real_tokens_only``, lit_moe_rl/experts.py): the experts output by hand;
log-probs, entropies and gradients as when every token runs, in all six families, one forward or shared
prompts, with the experts fed only the real tokens; when the learner turns it off."""

from __future__ import annotations

import pytest
import torch

import lit_moe_rl.experts as experts_module
from lit_moe_rl.experts import current_implementation, real_tokens_only, scatter_free_experts_forward
from lit_moe_rl.learner.prefix import SharedPrefix
from lit_moe_rl.policy import token_logprobs
from lit_moe_rl.tiny import FAMILIES
from tests.test_shared_prefix import P, assert_same_training, batch, build, learner_of, logprobs_and_grads


def experts_of(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith("mlp.experts"))


def test_padding_tokens_get_a_zero_experts_output_and_real_tokens_their_own():
    torch.manual_seed(0)
    experts = experts_of(build("qwen3_moe"))
    hidden = torch.randn(6, experts.gate_up_proj.shape[-1])
    index = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # tokens 0 and 5 are padding
    every = scatter_free_experts_forward(experts, hidden, index, weights)
    with real_tokens_only(mask):
        real = scatter_free_experts_forward(experts, hidden, index, weights)
        other_call = scatter_free_experts_forward(experts, hidden[:4], index[:4], weights[:4])
    assert every[[0, 5]].abs().gt(0).all() and real[[0, 5]].eq(0).all()
    torch.testing.assert_close(real[1:5], every[1:5], rtol=0, atol=1e-6)
    torch.testing.assert_close(other_call, every[:4], rtol=0, atol=0)  # 4 tokens: not the masked call
    with real_tokens_only(torch.ones(2, 3)):  # nothing to skip: the plain kernel, bitwise
        assert torch.equal(scatter_free_experts_forward(experts, hidden, index, weights), every)
    assert experts_module._REAL_TOKENS.get() is None  # the context is left as found


@pytest.mark.parametrize("shared", [False, True], ids=["one_forward", "shared_prompts"])
@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_padding_changes_no_logprob_or_gradient(family, shared, monkeypatch):
    """Each experts call sees only the real tokens of its decoder call (left-padded prompts, right-padded
    responses), and the log-probs, entropies and every parameter's gradient are those of every token."""
    model = build(family)
    assert current_implementation(model) == experts_module.KERNEL
    ids, mask = batch()
    prefix = SharedPrefix.find(ids, mask, P) if shared else None
    fed: list[int] = []
    routed = experts_module._routed_experts
    monkeypatch.setattr(
        experts_module, "_routed_experts", lambda self, h, *a: fed.append(h.shape[0]) or routed(self, h, *a)
    )
    every = logprobs_and_grads(model, ids, mask, prefix, skip_padding=False)
    fed_every, fed[:] = list(fed), []
    real = logprobs_and_grads(model, ids, mask, prefix, skip_padding=True)
    # the prompt forward's [U, P] and the responses' [n, R], or the one forward's [n, P + R]
    calls = [prefix.split(mask)[0], mask[:, P:]] if shared else [mask]
    per_layer = len(fed_every) // len(calls)  # MoE layers (DeepSeek-V3's first layer is dense)
    assert fed_every == [int(c.numel()) for c in calls for _ in range(per_layer)]
    assert fed == [int(c.sum()) for c in calls for _ in range(per_layer)]
    assert sum(fed) < sum(fed_every)
    assert_same_training(real, every)


def test_gradient_checkpointing_is_refused_in_one_line():
    """Its backward recomputes each layer outside the forward that said which tokens are padding."""
    model = build("qwen3_moe")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = batch()
    with pytest.raises(ValueError, match="skip_padding under gradient checkpointing"):
        token_logprobs(model, ids, mask, P, skip_padding=True)
    with torch.no_grad():  # nothing is recomputed without a backward
        token_logprobs(model, ids, mask, P, skip_padding=True)


def test_checkpointing_is_seen_when_turned_on_or_off_after_the_first_look():
    """``checkpointing_active`` finds the flagged modules once per model; the flags are read every time."""
    from lit_moe_rl.routing.replay import checkpointing_active

    model = build("qwen3_moe").train()
    assert not checkpointing_active(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointing_active(model)
    model.eval()  # transformers recomputes in training mode only
    assert not checkpointing_active(model)
    model.train().gradient_checkpointing_disable()
    assert not checkpointing_active(model)


def test_checkpointing_lookups_do_not_keep_a_model_alive():
    """The decoder itself has the flag: its cached entry must not hold it."""
    import gc
    import weakref

    from lit_moe_rl.routing.replay import checkpointing_active

    decoder = build("qwen3_moe").get_decoder()
    assert hasattr(decoder, "gradient_checkpointing") and not checkpointing_active(decoder)
    ref = weakref.ref(decoder)
    del decoder
    gc.collect()
    assert ref() is None


def test_learner_skips_padding_unless_it_cannot():
    def reason(**settings) -> str | None:
        return learner_of(**settings).padding_skip_off_reason()

    assert reason() is None
    assert reason(shared_prefix="off") is None  # one forward skips its padding too
    assert reason(skip_padding=False) == "model.skip_padding false"
    assert reason(gradient_checkpointing=True) == "gradient checkpointing"
    assert reason(experts_implementation="grouped_mm") == "experts grouped_mm"
    learner = learner_of()
    next(m for m in learner.policy.modules() if hasattr(m, "gate_up_proj"))._is_expert_parallel = True
    assert learner.padding_skip_off_reason() == "expert parallel"  # the kernel hands them to transformers'


def test_a_fit_step_trains_as_with_every_token(tmp_path, monkeypatch):
    """One RL step with the reference KL (π_ref's forward skips padding too): the experts see fewer tokens
    (the left padding of prompts of different lengths), and the samples, rewards, loss and gradient norm
    are those of the run that computes every token, to rounding."""
    from tests.helpers import run_fit, train_rows

    fed: list[int] = []
    routed = experts_module._routed_experts
    monkeypatch.setattr(
        experts_module, "_routed_experts", lambda self, h, *a: fed.append(h.shape[0]) or routed(self, h, *a)
    )
    kl = (
        "--model.algorithm=lit_moe_rl.algorithms.GRPO",
        "--model.algorithm.kl_coef=0.1",
        "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
    )
    rows, tokens = {}, {}
    for name, extra in (("skip", ()), ("every", ("--model.skip_padding=false",))):
        fed.clear()
        rows[name] = train_rows(run_fit(tmp_path / name, *kl, *extra, steps=1))
        tokens[name] = sum(fed)
    assert tokens["skip"] < tokens["every"]
    (a,), (b,) = rows["skip"], rows["every"]
    for name in ("reward/mean", "rollout/response_length", "ref/kl"):
        assert a[name] == b[name], name
    for name in ("policy/loss", "policy/entropy", "policy/grad_norm"):
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), name
