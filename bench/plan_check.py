"""The memory planner against measurement on CPU: ``python bench/plan_check.py``.

Each scaled-down configuration (a qwen3_moe of 3.2M parameters: big enough that the weights, AdamW's
state and a full copy dominate what stays allocated) trains two steps in this process; after the
second, :class:`~lit_moe_rl.parallel.plan_probe.PlanProbe` counts the live tensor bytes and plans the
same run. The table prints predicted vs measured resident memory; tests/test_plan.py asserts 20%.
Resident = what stays allocated between steps (sharded weights, AdamW state, a resident copy):
activations, the KV cache and the log-prob chunk come and go within a step (on a GPU,
``bench/gpu_check.py`` compares the plan's peak with ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = '{"family": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2}'  # noqa: E501
FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=1",
    "--trainer.strategy.tensor_parallel_size=1",
]
CONFIGS: dict[str, list[str]] = {
    "fp32, one process": [],
    "bf16-true, one process": ["--trainer.precision=bf16-true", "--model.lr=1e-3"],
    "FSDP2, resident copy": [*FSDP2],
    "FSDP2, unshard, fp32 master + bf16 compute": [*FSDP2, "--model.rollout_weights=unshard",
                                                   "--model.compute_dtype=bfloat16"],
    "FSDP2, unshard, LoRA r8 (attention + experts)": [
        *FSDP2, "--model.rollout_weights=unshard",
        '--model.lora={"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], '
        '"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}',
    ],
}  # fmt: skip


def measure(name: str, root: Path) -> dict[str, float]:
    """Two steps of configuration ``name``; the probe's record."""
    from tests.helpers import run_fit

    out = root / "probe.json"
    saved = dict(os.environ)
    try:
        run_fit(root, f"--model.config={MODEL}", "--data.num_val=0", "--trainer.limit_val_batches=0",
                "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
                "--trainer.callbacks+=lit_moe_rl.parallel.plan_probe.PlanProbe",
                f"--trainer.callbacks.path={out}", *CONFIGS[name], steps=2)  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)  # ModelParallelStrategy leaves MASTER_PORT & co. behind
    return json.loads(out.read_text())


def main(names: list[str] | None = None) -> list[tuple[str, float, float]]:
    rows = []
    for name in names or list(CONFIGS):
        with tempfile.TemporaryDirectory() as tmp:
            record = measure(name, Path(tmp))
        rows.append((name, record["planned_resident"], record["measured_resident"]))
    print(f"{'configuration':<50}{'planned MiB':>12}{'measured MiB':>13}{'ratio':>7}")
    for name, planned, measured in rows:
        print(f"{name:<50}{planned / 2**20:>12.2f}{measured / 2**20:>13.2f}{planned / measured:>7.2f}")
    return rows


if __name__ == "__main__":
    main()
