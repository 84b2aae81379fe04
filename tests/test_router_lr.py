"""``model.router_lr_scale``: the MoE routers in an AdamW group of their own (RSPO's router shift lives
where the router moves relative to the rest of the policy)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.errors import SettingsError
from lit_moe_rl.learner.optim import adamw_with_warmup, param_groups
from lit_moe_rl.lora import apply_lora
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.tiny import tiny_moe_config
from tests.helpers import run_fit, train_rows


def _policy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe"))


def test_the_routers_form_their_own_group_at_the_scaled_rate():
    policy = _policy()
    policy_group, router_group = param_groups(policy, lr=1e-3, router_lr_scale=10.0)
    gates = {id(layer.mlp.gate.weight) for layer in policy.model.layers}
    assert {id(p) for p in router_group["params"]} == gates  # exactly the 2 layers' gate weights
    assert gates.isdisjoint(id(p) for p in policy_group["params"])
    assert len(policy_group["params"]) + len(gates) == len(list(policy.parameters()))
    assert (policy_group["lr"], router_group["lr"]) == (1e-3, pytest.approx(1e-2))
    assert len(param_groups(policy, lr=1e-3)) == 1  # scale 1: one group, as before


def test_one_adamw_step_moves_the_router_scale_times_further():
    """AdamW's first step moves every coordinate by lr * g / (|g| + eps) ~= lr (bias-corrected m / sqrt(v)),
    so after one step with lr 1e-3 and scale 10 each router weight moved 1e-2 and every other weight 1e-3."""
    policy = _policy()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt, _ = adamw_with_warmup(param_groups(policy, lr=1e-3, router_lr_scale=10.0), lr=1e-3)
    for p in policy.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    for name, p in policy.named_parameters():
        step = (before[name] - p.detach()).abs()
        expected = 1e-2 if name.endswith("mlp.gate.weight") else 1e-3
        torch.testing.assert_close(step, torch.full_like(step, expected), rtol=1e-4, atol=0)


def test_fit_logs_the_router_rate_beside_the_policy_rate(tmp_path):
    rows = train_rows(run_fit(tmp_path, "--model.router_lr_scale=4", steps=1))
    assert rows[0]["policy/lr_router"] == pytest.approx(4 * rows[0]["policy/lr"])
    assert rows[0]["policy/lr"] == pytest.approx(1e-3)  # run_fit's lr


def test_the_logged_rates_are_the_ones_each_step_used_during_warmup(tmp_path):
    """Warm-up scales the rate by min(1, (step + 1) / (warmup + 1)): the first update runs at lr / 4 with
    3 warm-up steps, and its row says so (it logged the next step's rate, lr / 2, before)."""
    rows = train_rows(run_fit(tmp_path, "--model.router_lr_scale=4", "--model.warmup_steps=3", steps=5))
    assert [r["policy/lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert [r["policy/lr_router"] for r in rows] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 4e-3])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_a_non_positive_scale_is_one_line(scale):
    with pytest.raises(SettingsError, match=r"^model\.router_lr_scale: must be a finite number > 0"):
        MoERLModule(config={"family": "qwen3_moe"}, router_lr_scale=scale)


def test_a_scale_without_a_trained_router_is_one_line():
    policy = apply_lora(_policy(), {"rank": 4, "target_modules": ["q_proj"], "router": "frozen"})
    with pytest.raises(SettingsError, match=r"^model\.router_lr_scale: 2\.0 needs trained router parameters"):
        param_groups(policy, lr=1e-3, router_lr_scale=2.0)


def test_adamw_is_fused_where_torch_has_the_kernel_for_every_parameter():
    """One fused kernel per step on CPU (and CUDA); a device without it (meta here) leaves torch's choice."""
    opt, _ = adamw_with_warmup(param_groups(_policy(), lr=1e-3, router_lr_scale=2.0), lr=1e-3)
    assert opt.defaults["fused"] is True
    with torch.device("meta"):
        on_meta = torch.nn.Linear(2, 2)
    opt, _ = adamw_with_warmup(on_meta.parameters(), lr=1e-3)
    assert opt.defaults["fused"] is None
