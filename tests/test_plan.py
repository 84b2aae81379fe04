"""The memory planner (issue 16 items 5, 6): hand-worked sizes, the CLI, fit's refusal, the recipes'
plans, and predicted vs measured resident memory on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ROOT, run_fit  # noqa: E402

from lit_moe_rl.cli import main  # noqa: E402
from lit_moe_rl.parallel.plan import GiB, PlanSettings, make_plan, suggest_fixes  # noqa: E402
from lit_moe_rl.parallel.plan_cli import plan_file  # noqa: E402
from lit_moe_rl.parallel.plan_config import stated_hardware  # noqa: E402
from lit_moe_rl.parallel.plan_shape import KNOWN_CONFIGS, model_shape  # noqa: E402

sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def qwen30b():
    import transformers

    return model_shape(
        transformers.AutoConfig.for_model(**KNOWN_CONFIGS["Qwen3-30B-A3B"]), name="Qwen3-30B-A3B"
    )


def test_qwen3_30b_a3b_sizes_by_hand(qwen30b):
    # per layer: q 2048x4096, k and v 2048x512, o 4096x2048, q/k norms 2x128, 128 experts x (2048x1536 +
    # 768x2048), router 128x2048, two RMSNorms 2x2048; plus embeddings and LM head 151936x2048 each, final norm
    layer = 2048 * 4096 * 2 + 2048 * 512 * 2 + 256 + 128 * (2048 * 1536 + 768 * 2048) + 128 * 2048 + 4096
    assert qwen30b.params == 48 * layer + 2 * 151936 * 2048 + 2048 == 30_532_122_624
    # the old recipe (bf16-true): bf16 shards, bf16 AdamW moments, a resident bf16 copy of ~61 GB per rank
    old = PlanSettings(ranks=8, sharded=True, weight_dtype="bfloat16", compute_dtype="bfloat16", prompt_tokens=512,
                       max_new_tokens=8192, prompts_per_rank=16, group_size=8)  # fmt: skip
    parts = make_plan(qwen30b, old).gpu
    assert parts["sharded parameters (bfloat16)"] == (qwen30b.params * 2 // 8,) * 2
    assert parts["AdamW state (bfloat16)"][1] == qwen30b.params * 2 * 2 // 8
    assert parts["resident full copy (bfloat16)"] == (qwen30b.params * 2,) * 2
    # the figures: 96 KiB of bf16 keys and values per token (48 layers x 2 x 4 heads x 128), and
    # ~100 GiB for 128 rows x 8.7k tokens
    kv = next(v for k, v in parts.items() if k.startswith("KV cache"))[0]
    assert kv == 128 * 8704 * 48 * 2 * 4 * 128 * 2
    assert 100 < kv / GiB < 110
    # fp32 masters, unshard: fp32 shards and moments, bf16 full weights during generation only
    new = old.with_(weight_dtype="float32", rollout_weights="unshard", offload_optimizer=True)
    plan = make_plan(qwen30b, new)
    assert plan.gpu["sharded parameters (float32)"] == (qwen30b.params * 4 // 8,) * 2
    assert plan.gpu["AdamW state (float32)"] == (None, qwen30b.params * 8 // 8)
    assert plan.gpu["full weights for the rollout (bfloat16)"] == (qwen30b.params * 2, None)
    assert plan.resident == qwen30b.params * 4 // 8 + qwen30b.params * 8 // 8


def test_suggestions_fix_the_phase_that_does_not_fit(qwen30b):
    settings = PlanSettings(ranks=8, ranks_per_node=8, sharded=True, compute_dtype="bfloat16", prompt_tokens=512,
                            max_new_tokens=8192, prompts_per_rank=6, group_size=8, gradient_checkpointing=True,
                            micro_batch_size=2)  # fmt: skip
    plan = make_plan(qwen30b, settings, capacity=139 * GiB)
    assert plan.fits is False  # a resident copy, AdamW on the GPU, and a 40 GiB KV cache
    # the generation sets the peak: the resident copy is fp32 (a copy of the master weights), unsharding
    # gathers bf16; AdamW's 28 GiB per rank then go to the host
    assert plan.generation_peak > plan.update_peak
    assert suggest_fixes(plan) == ["model.rollout_weights: unshard", "model.offload_optimizer: true"]
    fixed = settings.with_(rollout_weights="unshard", offload_optimizer=True)
    assert make_plan(qwen30b, fixed, 139 * GiB).fits
    on_80 = make_plan(qwen30b, fixed, 79 * GiB)
    assert on_80.fits is False and suggest_fixes(on_80)[-1].startswith("KV cache for ")


def test_every_recipe_fits_its_stated_hardware_and_prints_its_plan_in_its_header():
    from bench.plan_headers import main as check_headers
    from bench.plan_headers import recipes

    paths = recipes()
    assert {p.name for p in paths} >= {"qwen3_30b_a3b_rspo.yaml", "qwen3_30b_a3b_lora_r3.yaml"}
    for path in paths:
        gpus, gib, host = stated_hardware(path.read_text())
        plan = plan_file(str(path), gpu_gib=gib, host_gib=host)
        assert plan.settings.ranks == gpus, path.name
        assert plan.fits and plan.host_fits, path.name
    assert check_headers(check=True) == 0  # the header shows what the planner prints today


def test_gpu_recipes_state_their_hardware():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        if (yaml.safe_load(text).get("trainer") or {}).get("accelerator") == "gpu":
            assert stated_hardware(text), f"{path.name}: no '# plan-hardware: N x G GiB' line"


def test_plan_command_says_what_does_not_fit_and_what_would(capsys):
    config = str(ROOT / "configs" / "tiny_fsdp2.yaml")
    main(["plan", "--config", config, "--gpu-memory-gib", "80"])
    assert "fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--config", config, "--gpu-memory-gib", "0.2", "--model.micro_batch_size=32"])
    out = capsys.readouterr().out
    assert exc.value.code == 1
    assert "DOES NOT FIT" in out and "largest part in the update: activations" in out
    assert "would fit with: model.rollout_weights: unshard; model.gradient_checkpointing: true" in out


def test_fit_refuses_at_start_what_the_plan_says_cannot_fit(tmp_path, capsys, restored_environ):
    os.environ["LIT_MOE_RL_GPU_MEMORY_GIB"] = "0.02"
    with pytest.raises(SystemExit) as exc:
        run_fit(tmp_path / "refused")
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "lit-moe-rl: error: model.memory_check: the memory plan needs" in err
    assert "per-rank GPU memory" in err  # the breakdown, above the one-line error
    run_fit(tmp_path / "forced", "--model.memory_check=false", steps=1)  # the setting overrides


@pytest.mark.parametrize(
    "name", ["FSDP2, resident copy", "FSDP2, unshard, fp32 master + bf16 compute",
             "FSDP2, unshard, LoRA r8 (attention + experts)"],
)  # fmt: skip
def test_planned_resident_memory_is_within_20_percent_of_measured_on_cpu(name, tmp_path):
    """Measured in a fresh process: live tensor bytes count everything a process holds, and in the
    suite's process earlier tests' state moved the LoRA case's numbers."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = f"import json; from pathlib import Path; from bench.plan_check import measure; " \
             f"print(json.dumps(measure({name!r}, Path({str(tmp_path)!r}))))"  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["planned_resident"] == pytest.approx(record["measured_resident"], rel=0.2)
