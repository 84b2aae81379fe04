"""AdamW's state off the device during generation (issue 16 item 3): freed in place, restored bitwise."""

from __future__ import annotations

import torch

from lit_moe_rl.parallel.offload import offloaded, state_tensors


def _stepped(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_state_is_freed_inside_and_bitwise_the_same_after():
    model, opt = _stepped()
    tensors = state_tensors(opt)
    assert len(tensors) == 2 * 4  # exp_avg and exp_avg_sq of 4 parameters (the step counts are scalars)
    before = [t.clone() for t in tensors]
    with offloaded(opt):
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors)  # device storage released
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b) and t.dtype == b.dtype
    assert all(t is s for t, s in zip(tensors, state_tensors(opt), strict=True))  # same tensor objects


def test_training_after_a_round_trip_is_bitwise_training_without_one():
    model_a, opt_a = _stepped()
    model_b, opt_b = _stepped()
    with offloaded(opt_b):
        pass
    x = torch.randn(5, 8)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        model(x).square().mean().backward()
        opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_optimizer_is_a_no_op():
    with offloaded(None):
        pass
