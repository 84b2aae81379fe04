"""Generate with the FSDP2 policy itself, unsharded once per rollout: no resident full copy.

``model.rollout_weights: unshard`` all-gathers every FSDP2 unit of the policy once before the rollout
(``FSDPModule.unshard``: into ``MixedPrecisionPolicy.param_dtype``, the compute dtype), keeps the
units unsharded through every forward of the generation loop (``reshard_after_forward`` off, so a
forward is a purely local computation: each rank's loop may run a different number of steps), and
reshards before the update. The full weights exist only during generation; the traffic is the one
all-gather per step that refreshing a resident copy costs. R3 records its routes on the very modules
the update then replays them on. PyTorch FSDP2 docs: ``FSDPModule.unshard``, ``reshard``,
``set_reshard_after_forward``.

``model.rollout_weights: resident`` keeps today's rank-local full copy (:mod:`lit_moe_rl.parallel.sharding`):
no all-gather latency in the rollout, one full set of weights more per rank between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def fsdp_units(policy: nn.Module) -> list[Any]:
    """Every FSDP2 unit (``FSDPModule``) inside ``policy``, outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in policy.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def unsharded(policy: nn.Module) -> Iterator[nn.Module]:
    """All-gather ``policy``'s FSDP2 units once, keep them whole inside the block, reshard on exit.

    Every rank must enter and leave at the same point (the all-gathers are collectives); inside, forwards
    run no collective. Each unit's ``reshard_after_forward`` is restored on exit.
    """
    units = fsdp_units(policy)
    saved = [_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield policy
    finally:
        for unit, setting in zip(units, saved, strict=True):
            _restore_reshard_setting(unit, setting)
            unit.reshard()


def _reshard_setting(unit: Any) -> tuple[bool, list[Any]]:
    """A unit's ``reshard_after_forward`` as FSDP2 keeps it (per parameter group; the root's is automatic)."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _restore_reshard_setting(unit: Any, setting: tuple[bool, list[Any]]) -> None:
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, infos = setting
    for group, info in zip(state._fsdp_param_groups, infos, strict=True):
        group.post_forward_mesh_info = info


ENGINE_DTYPE_REFUSED = (
    "rollout.engine.dtype: {dtype} keeps a resident copy of the weights in the engine, which "
    "model.rollout_weights: unshard exists to avoid; set rollout.engine.dtype: same (generation runs in "
    "model.compute_dtype), or model.rollout_weights: resident"
)


def check_engine(engine: Any) -> None:
    """An engine with its own weights' dtype copies the policy at bind: refused under ``unshard``."""
    from lit_moe_rl.errors import SettingsError

    dtype = getattr(engine, "dtype", "same")
    if dtype != "same":
        raise SettingsError(ENGINE_DTYPE_REFUSED.format(dtype=dtype))
