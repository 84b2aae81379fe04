"""LoRA through PEFT: what trains, the router settings, replay and RSPO through the wrapper, export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lit_moe_rl.lora import apply_lora
from lit_moe_rl.policy import load_policy
from lit_moe_rl.routing.adapters import find_moe_routers
from tests.helpers import TINY_ARGS, run_fit, train_rows

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora(**settings):
    torch.manual_seed(0)
    policy, _ = load_policy(None, {"family": "qwen3_moe"})
    return apply_lora(policy, {"rank": 4, "target_modules": ["q_proj", "v_proj"], **settings})


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_frozen_router_trains_only_the_adapters():
    model = _lora(target_parameters=EXPERTS)
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    assert any("experts" in n for n in names) and any("q_proj" in n for n in names)  # fused experts adapted
    assert not any("mlp.gate" in n for n in names)
    assert len(find_moe_routers(model)) == 2  # the routers are found through the wrappers


def test_router_full_trains_a_copy_and_adapted_gets_a_lora():
    full = _lora(router="full")
    assert any("mlp.gate.modules_to_save" in n for n in _trainable(full))
    routers = find_moe_routers(full)
    assert len(routers) == 2 and all("modules_to_save" in r.name for r in routers)
    adapted = _lora(router="adapted")
    assert any("mlp.gate" in n and "lora_" in n for n in _trainable(adapted))
    assert len(find_moe_routers(adapted)) == 2


@pytest.mark.parametrize(
    "settings, message",
    [({"rank": 0}, "model.lora.rank"), ({"router": "x"}, "model.lora.router"), ({"alpah": 1}, "'alpah'")],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        _lora(**settings)


def test_lora_fit_with_r3_rspo_and_reference_kl_replays_through_the_wrapper(tmp_path):
    """R3 replay, RSPO's router capture and the adapter-disabled reference, all through PEFT."""
    lora = {
        "rank": 4,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": EXPERTS,
        "router": "adapted",
    }
    out = tmp_path / "hf"
    rows = train_rows(
        run_fit(
            tmp_path,
            f"--model.lora={json.dumps(lora)}",
            "--model.algorithm=lit_moe_rl.algorithms.RSPO",
            "--model.algorithm.kl_coef=0.05",
            "--model.mini_batches=2",
            "--trainer.callbacks+=lit_moe_rl.callbacks.routing_replay.RoutingReplayCallback",
            "--trainer.callbacks.mode=R3",
            "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
            "--trainer.callbacks+=lit_moe_rl.callbacks.HFExportCallback",
            f"--trainer.callbacks.dirpath={out}",
            "--trainer.limit_val_batches=0",
            steps=4,
        )
    )
    assert rows[0]["ref/kl"] == pytest.approx(0.0, abs=1e-7)  # adapter disabled = the initial policy
    assert rows[-1]["ref/kl"] > 0 and rows[-1]["policy/grad_norm"] > 0
    assert "rspo/gamma_mean" in rows[-1]
    state = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert any("lora_A" in k for k in state)  # the checkpoint holds the adapters
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in k for k in exported.state_dict())  # merged into plain HF weights
    torch.manual_seed(0)
    x = torch.randint(3, 20, (2, 6))
    from lit_moe_rl.module import MoERLModule

    module = MoERLModule(config={"family": "qwen3_moe"}, lora=lora)
    module.configure_model()
    module.policy.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=x).logits, module.policy(input_ids=x).logits, rtol=1e-4, atol=1e-4
        )


def test_lora_checkpoint_holds_only_the_adapters_and_resumes_exactly(tmp_path):
    lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS}
    args = [
        "--model.pretrained=builtin:countdown-tiny-moe", "--model.config=null", f"--model.lora={json.dumps(lora)}",
        "--trainer.limit_val_batches=0",
    ]  # fmt: skip
    full = train_rows(run_fit(tmp_path / "full", *args, steps=4))
    run_fit(tmp_path / "part", *args, steps=2)
    last = next((tmp_path / "part").rglob("last.ckpt"))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # no frozen base weights
    assert ckpt["optimizer_states"][0]["state"]  # AdamW moments of the adapters
    resumed = train_rows(run_fit(tmp_path / "part", *args, "--ckpt_path=last", steps=4))
    assert len(resumed) == 2
    for before, after in zip(full[2:], resumed, strict=True):
        for key in ("reward/mean", "policy/loss", "policy/grad_norm", "policy/entropy"):
            assert after[key] == before[key], key


def test_a_target_the_model_lacks_is_one_line_naming_model_lora(capsys, tmp_path):
    from lit_moe_rl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", *TINY_ARGS, '--model.config={"family": "qwen3_moe"}', "--trainer.max_steps=1",
              '--model.lora={"target_modules": ["no_such_proj"]}', "--data.num_val=0",
              f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-moe-rl: error: model.lora: PEFT cannot apply it"), err
