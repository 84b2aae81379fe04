"""Every tensor the module logs or reduces across ranks is on ``module.device``.

NCCL cannot all-reduce a CPU tensor: ``val/reward`` logged from the rewards' CPU tensor with
``sync_dist=True`` would crash a multi-GPU run at its first validation. On a CPU machine every tensor
is on the CPU, so these tests give the module another device (``meta``) and check where each logged
value lives.
"""

from __future__ import annotations

import numbers

import torch

from lit_moe_rl.learner import Learner, LearnerSettings
from lit_moe_rl.module import MoERLModule
from lit_moe_rl.parallel import distributed

META = torch.device("meta")


def _module_on_meta(monkeypatch) -> tuple[MoERLModule, list[tuple[str, object]]]:
    module = MoERLModule(config={"family": "qwen3_moe"})
    module._device = META  # what LightningModule.device reports; the policy is never built
    logged: list[tuple[str, object]] = []
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.append((name, value)))
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.extend(values.items()))
    return module, logged


def _off_device(logged: list[tuple[str, object]]) -> list[str]:
    """Names of logged values that are neither a number (Lightning puts those on the module's device)
    nor a tensor on the module's device."""
    return [
        f"{name} on {value.device}" if isinstance(value, torch.Tensor) else f"{name} ({type(value).__name__})"
        for name, value in logged
        if not (isinstance(value, numbers.Number) or isinstance(value, torch.Tensor) and value.device == META)
    ]


def test_val_reward_is_logged_on_the_module_device(monkeypatch):
    module, logged = _module_on_meta(monkeypatch)
    module.validation_step({"val_rewards": torch.tensor([1.0, 0.0, 0.5])}, 0)  # the callback's CPU rewards
    assert [name for name, _ in logged] == ["val/reward"]
    assert not _off_device(logged)


def test_step_metrics_and_their_reductions_use_the_module_device(monkeypatch):
    module, logged = _module_on_meta(monkeypatch)
    module.learner = Learner(torch.nn.Linear(1, 1), module.algorithm, LearnerSettings())
    module.learner.collectives = distributed.Collectives(module.device)
    module.learner.step_tokens = 4.0
    devices: list[torch.device] = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))

    def all_reduce(values, op, device):  # every reduction is packed on the module's device
        devices.append(device)
        return values

    monkeypatch.setattr(distributed, "_all_reduce", all_reduce)
    module.log_reduced({"policy/loss": 0.5, "reward/mean": torch.tensor(0.25), "perf/update_s": 1.0})
    assert devices and all(d == META for d in devices)
    assert len(logged) == 3
