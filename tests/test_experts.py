"""``model.experts_implementation``: the scatter-free experts kernel equals transformers' ``grouped_mm``."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_moe_rl.errors import SettingsError
from lit_moe_rl.experts import KERNEL, apply_experts_implementation, register
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.policy import load_policy
from lit_moe_rl.tiny import FAMILIES, tiny_moe_config
from tests.helpers import run_fit, save_dense_model, train_rows


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, impl: str):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.log_softmax(-1)[..., 5].sum().backward()  # every position's gradient flows back
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernel_equals_grouped_mm(family, top_k):
    """Same rows, same order, same grouped matmul: logits bitwise equal in every family. At K = 2 every
    gradient is bitwise equal too (a + b == b + a); above it a token's hidden-state gradient sums its K
    copies in another order, so gradients agree to rounding."""
    assert register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, num_experts_per_tok=top_k))
    ids = torch.randint(3, model.config.vocab_size, (4, 12))
    ref_logits, ref_grads = _logits_and_grads(model, ids, "grouped_mm")
    logits, grads = _logits_and_grads(model, ids, KERNEL)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    assert any("experts" in n for n in grads)  # the experts' weights were trained through the kernel
    for name, ref in ref_grads.items():
        if top_k == 2:
            assert torch.equal(grads[name], ref), name
        else:
            torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_a_loaded_policy_uses_the_kernel_and_a_named_one_replaces_it():
    model, _ = load_policy(config={"family": "qwen3_moe"})
    assert model.config._experts_implementation == KERNEL  # auto: grouped_mm became the kernel
    assert apply_experts_implementation(model, "grouped_mm") == "grouped_mm"
    assert apply_experts_implementation(model, "eager") == "eager"
    assert apply_experts_implementation(model, "auto") == "eager"  # auto leaves a non-default choice alone


def test_the_reference_model_gets_the_policys_kernel():
    """``initial_policy`` (the reference of a resumed or sharded run) runs the kernel the policy runs: under
    rank-0 loading a rank that builds a skeleton got transformers' ``grouped_mm``, so π_ref skipped
    padding on one rank and not on the other (tests/test_unshard.py's CLI test found it)."""
    from lit_moe_rl.experts import current_implementation

    for kernel in ("eager", KERNEL):
        module = MoERLModule(config={"family": "qwen3_moe"}, experts_implementation=kernel)
        module.configure_model()
        assert (
            current_implementation(module.policy) == current_implementation(module.initial_policy()) == kernel
        )


def test_an_unknown_kernel_is_one_line():
    model, _ = load_policy(config={"family": "qwen3_moe"})
    with pytest.raises(ValueError, match=r"^model\.experts_implementation: 'fastest' was refused: ") as err:
        apply_experts_implementation(model, "fastest")
    assert "\n" not in str(err.value)


def test_an_unknown_kernel_in_the_settings_is_refused_before_the_model_loads():
    with pytest.raises(
        SettingsError, match=r"^model\.experts_implementation: unknown 'fastest'; choose one of auto, eager"
    ):
        MoERLModule(config={"family": "qwen3_moe"}, experts_implementation="fastest")
    assert (
        MoERLModule(config={"family": "qwen3_moe"}, experts_implementation=KERNEL).policy is None
    )  # not loaded


def test_a_dense_model_has_no_experts_to_set(tmp_path):
    model, _ = load_policy(str(save_dense_model(tmp_path / "dense")))
    assert apply_experts_implementation(model) is None  # auto: nothing to switch
    with pytest.raises(ValueError, match=r"^model\.experts_implementation: Qwen3ForCausalLM has no experts"):
        apply_experts_implementation(model, "grouped_mm")


def test_a_fit_with_the_kernel_equals_one_with_grouped_mm(tmp_path):
    """At K = 2 the kernel is bitwise grouped_mm in the forward and the backward: the same samples, rewards,
    losses and gradient norms, step after step (padding computed, as grouped_mm computes it)."""
    ours = train_rows(run_fit(tmp_path / "ours", "--model.skip_padding=false", steps=3))
    theirs = train_rows(run_fit(tmp_path / "theirs", "--model.experts_implementation=grouped_mm", steps=3))
    timing = ("perf/", "time/", "memory/")
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(timing)} == {
            k: v for k, v in b.items() if not k.startswith(timing)
        }
    assert ours[-1]["policy/grad_norm"] > 0  # it trained
