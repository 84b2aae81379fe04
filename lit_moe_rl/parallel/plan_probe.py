"""A callback that writes the running fit's memory plan beside what was measured (JSON), for
``bench/plan_check.py`` (CPU: live tensor bytes) and ``bench/gpu_check.py`` (``max_memory_allocated``)."""

from __future__ import annotations

import gc
import json

import lightning as L
import torch

from lit_moe_rl.parallel.measure import live_tensor_bytes


class PlanProbe(L.Callback):
    """After the second step (AdamW's state exists, gradients are freed): the live tensor bytes of the
    module's device against the plan's resident part, planned with the prompts' real padded length;
    at the end, on CUDA, ``torch.cuda.max_memory_allocated`` against the plan's peak. Written to ``path``
    by rank 0."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != 1:
            return
        from lit_moe_rl.parallel.plan_check import run_plan

        gc.collect()
        plan = run_plan(pl_module, trainer, None, prompt_tokens=batch["rollout"].prompt_len)
        self.record.update(
            measured_resident=live_tensor_bytes(pl_module.device.type),
            planned_resident=plan.resident,
            planned_generation=plan.generation_peak,
            planned_update=plan.update_peak,
            planned_peak=plan.peak,
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.record["cuda_max_allocated"] = torch.cuda.max_memory_allocated(pl_module.device)
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(self.record, f)
