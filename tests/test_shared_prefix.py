"""Shared-prompt forwards (``model.shared_prefix``, lit_moe_rl/learner/prefix.py): rows that share a prompt
run it once and their responses attend to its KV cache. The layout by hand; the log-probs, entropies and
gradients of the single forward in all six families; router capture (RSPO) and recording (R2) in the
``[n, P + R]`` layout; when the learner turns it off."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.experts import apply_experts_implementation
from lit_moe_rl.learner.prefix import SharedPrefix
from lit_moe_rl.policy import prepare_for_rl, token_logprobs
from lit_moe_rl.routing.record import capture_router_logits, record_routes
from lit_moe_rl.tiny import FAMILIES, tiny_moe_config

P, R, G = 7, 9, 4  # prompt columns, response columns, completions per prompt


def test_layout_by_hand():
    ids = torch.tensor([[0, 5, 6, 1, 1], [7, 8, 9, 2, 2], [0, 5, 6, 3, 0], [7, 8, 9, 4, 0], [0, 5, 6, 5, 5]])
    mask = (torch.arange(5) > 0).long().expand(5, 5).clone()
    mask[1, 0] = mask[3, 0] = 1  # rows 1 and 3 have no left padding
    prefix = SharedPrefix.find(ids, mask, 3)
    assert prefix.first.tolist() == [0, 1] and prefix.inverse.tolist() == [0, 1, 0, 1, 0]
    prompt, response = prefix.split(ids)
    assert prompt.tolist() == [[0, 5, 6], [7, 8, 9]] and torch.equal(response, ids[:, 3:])
    assert torch.equal(prefix.join(prompt, response), ids)  # the round trip
    # groups split a prompt that two GRPO groups share: each group ran its own prefill
    grouped = SharedPrefix.find(ids, mask, 3, groups=torch.tensor([0, 0, 0, 1, 1]))
    assert grouped.first.tolist() == [0, 1, 3, 4] and grouped.inverse.tolist() == [0, 1, 0, 2, 3]
    # the same tokens with another padding mask are another prompt
    other = mask.clone()
    other[4, 0] = 1
    assert SharedPrefix.find(ids, other, 3).inverse.tolist() == [0, 1, 0, 1, 2]
    # nothing shared: still the two forwards, as on every other rank (under FSDP each is a collective)
    assert SharedPrefix.find(ids[:2], mask[:2], 3).first.tolist() == [0, 1]
    assert SharedPrefix.find(ids[:, :3], mask[:, :3], 3) is None  # no response column
    # the positions predicting the response: the prompt's last column, then all response columns but the last
    assert prefix.split_positions(slice(2, -1)) == (slice(2, 3), slice(0, -1))
    assert prefix.split_positions(slice(4, None)) == (slice(3, 3), slice(1, None))
    with pytest.raises(ValueError, match="must start at 0 or later and stop at the end"):
        prefix.split_positions(slice(0, 4))


def build(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_moe_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_experts_implementation(model)
    prepare_for_rl(model)
    return model


def batch(prompts: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts x G`` rows in shuffled order: a left-padded prompt, responses of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, 60, (prompts, P), generator=gen)
    prompt_mask = torch.ones_like(prompt)
    prompt[0, :3], prompt_mask[0, :3] = 0, 0
    response = torch.randint(4, 60, (prompts * G, R), generator=gen)
    lengths = torch.randint(2, R + 1, (prompts * G,), generator=gen)
    response_mask = (torch.arange(R) < lengths[:, None]).long()
    ids = torch.cat([prompt.repeat_interleave(G, 0), response * response_mask], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), response_mask], 1)
    order = torch.randperm(len(ids), generator=gen)
    return ids[order], mask[order]


def logprobs_and_grads(model, ids, mask, prefix, **kwargs):
    logp, entropy, _ = token_logprobs(model, ids, mask, P, with_entropy=True, prefix=prefix, **kwargs)
    (logp * torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_forward_equals_the_single_forward(family):
    """Log-probs, entropies and every parameter's gradient as one forward over ``[n, P + R]`` gives them, to
    float rounding; a sliding window shorter than the rows (Mixtral, GPT-OSS) included."""
    window = {"sliding_window": 5} if family in ("mixtral", "gpt_oss") else {}
    model = build(family, **window)
    ids, mask = batch()
    prefix = SharedPrefix.find(ids, mask, P)
    assert prefix.num_prompts == 3
    tokens: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True
    )
    single = logprobs_and_grads(model, ids, mask, None)
    shared = logprobs_and_grads(model, ids, mask, prefix)
    hook.remove()
    assert tokens == [ids.numel(), 3 * P, len(ids) * R]  # each prompt ran once
    response = mask[:, P:].bool()
    assert single[0][response].lt(0).all() and shared[0][~response].eq(0).all()
    assert_same_training(shared, single)


def assert_same_training(got, want) -> None:
    """Log-probs and entropies to 5e-6, every parameter's gradient to 1e-4 relative (float rounding)."""
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=5e-6)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=5e-6)
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_router_capture_and_recording_join_the_two_forwards():
    """RSPO's capture at the positions predicting the response, and R2's recorded routes, come out in the
    ``[n, P + R]`` layout, equal to the single forward's (native routing: same routes to rounding)."""
    model = build("qwen3_moe")
    ids, mask = batch()
    prefix = SharedPrefix.find(ids, mask, P)
    out = {}
    for name, layout in (("single", None), ("shared", prefix)):
        with (
            torch.no_grad(),
            capture_router_logits(model, positions=slice(P - 1, -1), prefix=layout) as cap,
            record_routes(model.get_decoder(), layout) as rec,
        ):
            token_logprobs(model, ids, mask, P, prefix=layout)
        out[name] = cap.router_logp, cap.topk, rec.routes
    (logp_a, topk_a, routes_a), (logp_b, topk_b, routes_b) = out["single"], out["shared"]
    layers, experts = len(model.model.layers), model.config.num_experts
    assert logp_b.shape == (len(ids), R, layers, experts)
    assert routes_b.shape == (*ids.shape, layers, model.config.num_experts_per_tok)
    torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=5e-6)
    assert torch.equal(topk_b, topk_a) and torch.equal(routes_b, routes_a)


def learner_of(**settings):
    """The learner of a tiny Qwen3-MoE module built with ``settings`` (``model.*``)."""
    from lit_moe_rl.module import MoERLModule

    module = MoERLModule(config={"family": "qwen3_moe"}, **settings)
    module.configure_model()
    return module.learner


def test_learner_turns_it_off_where_the_cache_cannot_be_used():
    def reason(**settings) -> str | None:
        return learner_of(**settings).shared_prefix_off_reason()

    assert reason() is None
    assert reason(shared_prefix="off") == "model.shared_prefix off"
    assert reason(gradient_checkpointing=True) == "gradient checkpointing"
    assert reason(router_aux_loss_coef=0.01) == "router aux loss"


def test_an_unquoted_yaml_off_turns_it_off(tmp_path, caplog):
    """YAML reads ``shared_prefix: off`` as false: it means off (and ``on``, true, means auto)."""
    import logging

    from tests.helpers import run_fit

    caplog.set_level(logging.INFO)
    config = tmp_path / "off.yaml"
    config.write_text("model:\n  shared_prefix: off\n")
    run_fit(tmp_path / "run", f"--config={config}")
    summary = "\n".join(r.getMessage() for r in caplog.records if "run summary" in r.getMessage())
    assert "shared prompts off (model.shared_prefix off)" in summary
