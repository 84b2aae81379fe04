"""R3 routing record / replay (arXiv 2510.11370 §4.1) on tiny random models of every MoE family."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from lit_moe_rl.routing import adapters
from lit_moe_rl.routing.adapters import find_moe_routers, moe_layout, register_adapter, route_dtype
from lit_moe_rl.routing.checks import require_moe, validate_routes
from lit_moe_rl.routing.record import (
    align_generation_routes,
    capture_router_logits,
    gather_router_logp,
    record_routes,
)
from lit_moe_rl.routing.replay import replay_routes
from lit_moe_rl.tiny import FAMILIES, tiny_moe_config

PAD = 0


def routing_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family)).eval()


def routing_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of different lengths."""
    input_ids = torch.tensor([[PAD, PAD, 5, 6, 7], [3, 4, 5, 6, 7]])
    return input_ids, (input_ids != PAD).long()


def routing_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What HF generate uses: cumsum of the mask - 1, 0 on padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def routing_random_routes(batch: int, seq: int, model: nn.Module, seed: int = 1) -> torch.Tensor:
    """Valid random routes: K distinct ids per (token, layer)."""
    layers, top_k, experts = moe_layout(model)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, seq, layers, experts, generator=gen).argsort(-1)[..., :top_k].to(torch.int8)


def routing_forward(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def routing_native_routes(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), record_routes(model) as rec:
        routing_forward(model, input_ids)
    return rec.routes


def routing_response_mask(sequences: torch.Tensor, prompt_len: int, eos: int = 2) -> torch.Tensor:
    """1 up to and including the first EOS of each response, 0 after (training layout)."""
    response = sequences[:, prompt_len:]
    after_eos = (response == eos).long().cumsum(-1) - (response == eos).long()
    return (after_eos == 0).long()


# ---------------------------------------------------------------- generate -> record -> replay


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_routes_replay_reproduces_generate_logits(family):
    model = routing_model(family)
    input_ids, prompt_mask = routing_batch()
    with torch.no_grad(), record_routes(model) as rec:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            max_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD,
        )
    sequences, prompt_len = out.sequences, input_ids.shape[1]
    steps = len(out.logits)
    assert rec.calls == steps  # prefill + (steps - 1) decode steps; the last token is never fed
    assert rec.routes.shape == (2, prompt_len + steps - 1, *moe_layout(model)[:2])
    assert rec.routes.dtype == torch.int8

    response_mask = routing_response_mask(sequences, prompt_len)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    routes = align_generation_routes(rec.routes, mask, sequences.shape[1])
    assert (routes[:, -1] == -1).all() and (routes[0, :2] == -1).all()
    with torch.no_grad(), replay_routes(model, routes, input_ids=sequences) as rp:
        logits = routing_forward(
            model, sequences, attention_mask=mask, position_ids=routing_position_ids(mask)
        )
    assert rp.consumed == [1] * moe_layout(model)[0]
    assert rp.fallback_tokens == int((routes[..., 0, 0] < 0).sum())
    predicting = logits[:, prompt_len - 1 : prompt_len - 1 + steps]  # positions that sampled each step
    valid = response_mask[:, :steps].bool()
    torch.testing.assert_close(predicting[valid], torch.stack(out.logits, 1)[valid], atol=1e-5, rtol=1e-5)
    replayed = routes[:, :-1] >= 0
    agreement = (rp.native_routes[:, :-1].sort(-1).values == routes[:, :-1].sort(-1).values)[replayed]
    assert agreement.float().mean() > 0.5  # routing/agreement is free to log


def test_num_return_sequences_expands_prompts_before_prefill():
    model = routing_model("qwen3_moe")
    input_ids, mask = routing_batch()
    with torch.no_grad(), record_routes(model) as rec:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=3,
            num_return_sequences=3,
            pad_token_id=PAD,
        )
    assert rec.routes.shape[0] == out.shape[0] == 6
    torch.testing.assert_close(rec.routes[0, :5], rec.routes[2, :5])  # same prompt, same prefill routes


def test_align_generation_routes_by_hand():
    routes = torch.arange(2 * 4 * 1 * 1, dtype=torch.int8).reshape(2, 4, 1, 1)  # recorded 4 positions
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # left pad / pad after EOS
    aligned = align_generation_routes(routes, mask, num_positions=6)
    assert aligned[..., 0, 0].tolist() == [[-1, 1, 2, 3, -1, -1], [4, 5, 6, 7, -1, -1]]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        align_generation_routes(routes, mask[:, :5], num_positions=6)
    with pytest.raises(ValueError, match="exceed num_positions"):
        align_generation_routes(routes, mask[:, :3], num_positions=3)


# ---------------------------------------------------------------- what replay does to the forward


def routing_capture_expert_ids(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Forward pre-hooks on every ``mlp.experts``: the top-k ids each call received."""
    seen, handles = [], []
    for router in find_moe_routers(model):
        experts = router.block.experts
        hook = experts.register_forward_pre_hook(lambda _m, args, _kw: seen.append(args[1]), with_kwargs=True)
        handles.append(hook)
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_receive_exactly_the_replayed_ids(family):
    model = routing_model(family)
    input_ids = torch.randint(3, 64, (2, 7))
    routes = routing_random_routes(2, 7, model)
    seen, handles = routing_capture_expert_ids(model)
    with torch.no_grad(), replay_routes(model, routes) as rp:
        routing_forward(model, input_ids)
    for handle in handles:
        handle.remove()
    layers, top_k, _ = moe_layout(model)
    assert len(seen) == layers
    for layer, ids in enumerate(seen):
        assert torch.equal(ids, routes[:, :, layer].reshape(-1, top_k).long())
    assert not torch.equal(rp.native_routes, routes)  # random routes differ from the native ones


@pytest.mark.parametrize("family", FAMILIES)
def test_router_weight_gets_gradient_under_replay(family):
    model = routing_model(family)
    routes = routing_random_routes(2, 6, model)
    with replay_routes(model, routes):
        routing_forward(model, torch.randint(3, 64, (2, 6))).sum().backward()
    for router in find_moe_routers(model):
        assert router.module.weight.grad is not None and router.module.weight.grad.abs().sum() > 0


def routing_logits_and_grads(model: nn.Module, input_ids, routes):
    model.zero_grad()
    with replay_routes(model, routes) as rp:
        logits = routing_forward(model, input_ids)
        logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, rp


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_survives_gradient_checkpointing(family):
    model = routing_model(family).train()
    input_ids = torch.randint(3, 64, (2, 6))
    routes = routing_random_routes(2, 6, model)
    logits, grads, _ = routing_logits_and_grads(model, input_ids, routes)
    model.gradient_checkpointing_enable()
    ckpt_logits, ckpt_grads, rp = routing_logits_and_grads(model, input_ids, routes)
    assert rp.recomputes == moe_layout(model)[0] and rp.consumed == [1] * moe_layout(model)[0]
    torch.testing.assert_close(ckpt_logits, logits, atol=0, rtol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_replay_survives_reentrant_gradient_checkpointing():
    model = routing_model("qwen2_moe").train()
    input_ids = torch.randint(3, 64, (2, 5))
    routes = routing_random_routes(2, 5, model)
    logits, grads, _ = routing_logits_and_grads(model, input_ids, routes)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ckpt_logits, ckpt_grads, rp = routing_logits_and_grads(model, input_ids, routes)
    assert rp.recomputes == 2 and rp.consumed == [1, 1]
    torch.testing.assert_close(ckpt_logits, logits, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_backward_outside_the_block_under_checkpointing_is_an_error():
    model = routing_model("qwen3_moe").train()
    model.gradient_checkpointing_enable()
    routes = routing_random_routes(1, 4, model)
    with (
        pytest.raises(RuntimeError, match="backward\\(\\) did not run inside the block"),
        replay_routes(model, routes),
    ):
        routing_forward(model, torch.randint(3, 64, (1, 4)))


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_native_routes_is_bit_exact(family):
    model = routing_model(family)
    input_ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        native = routing_forward(model, input_ids)
        routes = routing_native_routes(model, input_ids)
        with replay_routes(model, routes) as rp:
            replayed = routing_forward(model, input_ids)
    assert torch.equal(replayed, native)
    assert torch.equal(rp.native_routes, routes)


def test_micro_batches_each_in_their_own_block_match_the_full_batch():
    model = routing_model("olmoe")
    input_ids = torch.randint(3, 64, (4, 6))
    routes = routing_random_routes(4, 6, model)
    with torch.no_grad():
        with replay_routes(model, routes):
            full = routing_forward(model, input_ids)
        parts = []
        for rows in (slice(0, 1), slice(1, 4)):
            with replay_routes(model, routes[rows], input_ids=input_ids[rows]):
                parts.append(routing_forward(model, input_ids[rows]))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_minus_one_rows_fall_back_to_native_routing_and_are_counted(family):
    model = routing_model(family)
    input_ids = torch.randint(3, 64, (2, 6))
    routes = routing_random_routes(2, 6, model)
    routes[0, :3] = -1
    routes[1, 5] = -1
    seen, handles = routing_capture_expert_ids(model)
    with torch.no_grad(), replay_routes(model, routes) as rp:
        routing_forward(model, input_ids)
    for handle in handles:
        handle.remove()
    assert rp.fallback_tokens == 4
    native = rp.native_routes.long()
    expected = torch.where(routes >= 0, routes.long(), native)
    for layer, ids in enumerate(seen):
        assert torch.equal(ids, expected[:, :, layer].reshape(ids.shape))


def test_qwen2_moe_shared_expert_is_untouched():
    model = routing_model("qwen2_moe")
    input_ids = torch.randint(3, 64, (2, 6))
    calls = []
    for router in find_moe_routers(model):
        router.block.shared_expert.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        native = routing_forward(model, input_ids)
        routes = routing_native_routes(model, input_ids)
        calls.clear()
        with replay_routes(model, routes):
            replayed = routing_forward(model, input_ids)
    assert torch.equal(replayed, native)
    assert len(calls) == 2  # the shared expert still runs in both MoE layers


# ---------------------------------------------------------------- loud errors


def test_dense_model_is_an_error():
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config = transformers.Qwen3Config(**sizes, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    dense = transformers.AutoModelForCausalLM.from_config(config)
    assert find_moe_routers(dense) == [] and moe_layout(dense) == (0, 0, 0)
    with pytest.raises(ValueError, match="R3: model has no MoE layer \\(found no router module\\)"):
        require_moe(dense, "R3")
    routes = torch.zeros(1, 2, 1, 1, dtype=torch.int8)
    with (
        pytest.raises(ValueError, match="replay_routes: model has no MoE layer"),
        replay_routes(dense, routes),
    ):
        pass


def routing_bad_routes(case: str, routes: torch.Tensor) -> torch.Tensor:
    """``routes [2, 6, 2, 2]`` broken one way."""
    if case == "layers":
        return routes[:, :, :1]
    if case == "top_k":
        return routes[..., :1]
    if case == "dims":
        return routes[0]
    if case == "dtype":
        return routes.float()
    routes = routes.clone()
    if case == "range":
        routes[0, 2, 1, 1] = 9
    elif case == "duplicate":
        routes[1, 3, 0, 1] = routes[1, 3, 0, 0]
    elif case == "partial":
        routes[0, 4, 1, 0] = -1
    elif case == "empty_layer":
        routes[:, :, 1] = -1
    return routes


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("layers", "routes: 1 MoE layers in routes, model has 2"),
        ("top_k", "routes: top-k 1 in routes, model routes top-2"),
        ("dims", "routes: expected 4 dims"),
        ("dtype", "routes: dtype torch.float32 is not an integer type"),
        ("range", "routes: expert id 9 out of range \\[0, 8\\) at layer 1"),
        ("duplicate", "routes: duplicate expert id \\d within a token at layer 0 \\(batch 1, position 3\\)"),
        ("partial", "routes: partial route .* at layer 1, batch 0, position 4"),
        ("empty_layer", "routes: layer 1 has no valid route while other layers do"),
    ],
)
def test_bad_routes_each_raise_their_own_error(case, message):
    model = routing_model("qwen3_moe")
    routes = routing_bad_routes(case, routing_random_routes(2, 6, model))
    with pytest.raises(ValueError, match=message), replay_routes(model, routes):
        pass


def test_misaligned_routes_are_an_error_up_front_and_at_hook_time():
    model = routing_model("mixtral")
    routes = routing_random_routes(2, 6, model)
    input_ids = torch.randint(3, 64, (2, 7))
    message = "routes: token alignment: routes cover \\[B, S\\] = \\[2, 6\\], input_ids is \\[2, 7\\]"
    with pytest.raises(ValueError, match=message), replay_routes(model, routes, input_ids=input_ids):
        pass
    message = "router model.layers.0.mlp.gate \\(layer 0\\) saw 14 tokens, routes cover B\\*S = 2\\*6 = 12"
    with pytest.raises(RuntimeError, match=message), torch.no_grad(), replay_routes(model, routes):
        routing_forward(model, input_ids)
    message = "saw a \\[B, S\\] = \\[3, 4\\] batch, routes are \\[2, 6\\]"
    with pytest.raises(RuntimeError, match=message), torch.no_grad(), replay_routes(model, routes):
        routing_forward(model, torch.randint(3, 64, (3, 4)))


@torch.no_grad()
def test_router_never_called_or_called_twice_is_an_error(monkeypatch):
    model = routing_model("qwen3_moe")
    input_ids = torch.randint(3, 64, (1, 5))
    routes = routing_random_routes(1, 5, model)
    message = "replay_routes: router model.layers.{} consumed routes {} times, expected 1"
    with pytest.raises(RuntimeError, match=message.format("0.mlp.gate", 0)), replay_routes(model, routes):
        pass  # no forward at all
    mlp = model.model.layers[1].mlp
    with pytest.raises(RuntimeError, match=message.format("1.mlp.gate", 2)), replay_routes(model, routes):
        routing_forward(model, input_ids)
        mlp.gate(torch.zeros(5, 32))  # a stray second call during the block
    monkeypatch.setattr(mlp, "forward", lambda hidden: torch.zeros_like(hidden))  # layer 1 skips its MoE
    with pytest.raises(RuntimeError, match=message.format("1.mlp.gate", 0)), replay_routes(model, routes):
        routing_forward(model, input_ids)


def test_validate_routes_accepts_good_routes_and_empty_tensors():
    routes = torch.tensor([[[[0, 1]], [[-1, -1]]]])
    validate_routes(routes, num_layers=1, top_k=2, num_experts=2, seq_shape=(1, 2))
    validate_routes(routes[:, :0], num_layers=1, top_k=2, num_experts=2)


# ---------------------------------------------------------------- discovery, adapters, capture


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_find_moe_routers_layers_and_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = routing_model("deepseek_v3")  # first layer dense
    routers = find_moe_routers(model)
    assert [(r.name, r.layer) for r in routers] == [("model.layers.1.mlp.gate", 0)]
    assert moe_layout(model) == (1, 2, 8)
    wrapped = peft.get_peft_model(routing_model("qwen3_moe"), peft.LoraConfig(target_modules=["q_proj"]))
    assert [r.layer for r in find_moe_routers(wrapped)] == [0, 1]
    input_ids = torch.randint(3, 64, (1, 4))
    with torch.no_grad(), replay_routes(wrapped, routing_random_routes(1, 4, wrapped)) as rp:
        wrapped(input_ids=input_ids)
    assert rp.forwards == 1


def test_unknown_router_class_is_an_error_naming_it(monkeypatch):
    class MysteryRouter(nn.Module):
        top_k, num_experts = 2, 4

    block = nn.Module()
    block.gate, block.experts = MysteryRouter(), nn.Module()
    model = nn.Sequential(block)
    with pytest.raises(ValueError, match="no RouterAdapter for router class MysteryRouter"):
        find_moe_routers(model)
    monkeypatch.setattr(adapters, "_ADAPTERS", dict(adapters._ADAPTERS))  # keep the registry clean
    register_adapter("MysteryRouter", adapters.SoftmaxTopKAdapter(renormalize=True))
    assert find_moe_routers(model)[0].num_experts == 4


def test_route_dtype():
    assert route_dtype(8) == route_dtype(128) == torch.int8
    assert route_dtype(129) == route_dtype(32767) == torch.int16
    assert route_dtype(40000) == torch.int32


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_native_gate_weights(family):
    model = routing_model(family)
    for router in find_moe_routers(model):
        hidden = torch.randn(5, 32)
        logits, weights, indices = router.module(hidden)
        replayed = router.adapter.gate_weights(router.module, logits, indices)
        assert replayed.dtype == weights.dtype and torch.equal(replayed, weights)


def test_capture_router_logits_shapes_selection_and_replay():
    model = routing_model("qwen3_moe")
    input_ids = torch.randint(3, 64, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad(), capture_router_logits(model) as cap, record_routes(model) as rec:
        routing_forward(model, input_ids)
    assert cap.router_logp.shape == (2, 6, 2, 8) and cap.router_logp.dtype == torch.float32
    torch.testing.assert_close(cap.router_logp.exp().sum(-1), torch.ones(2, 6, 2))
    assert torch.equal(cap.topk, rec.routes)
    picked = gather_router_logp(cap.router_logp, rec.routes)
    assert picked.shape == (2, 6, 2, 2)
    assert (picked >= cap.router_logp.max(-1, keepdim=True).values - 10).all()
    routes = routing_random_routes(2, 6, model)
    routes[0, 0] = -1
    with torch.no_grad(), capture_router_logits(model, positions=mask) as sel, replay_routes(model, routes):
        routing_forward(model, input_ids)
    assert sel.router_logp.shape == (6, 2, 8)
    torch.testing.assert_close(sel.router_logp[:, 0], cap.router_logp[mask][:, 0])  # layer 0: same input
    assert torch.equal(sel.topk, routes[mask])  # capture sees the ids the experts consumed
    assert gather_router_logp(cap.router_logp, routes)[0, 0].eq(0).all()
    with torch.no_grad(), capture_router_logits(model, positions=slice(4, 6), kind="log_sigmoid") as sig:
        routing_forward(model, input_ids)
    assert sig.router_logp.shape == (2, 2, 2, 8) and (sig.router_logp < 0).all()
