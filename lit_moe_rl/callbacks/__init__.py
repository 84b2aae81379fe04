"""Lightning callbacks: rollout generation, routing replay, reference KL, router-shift logging, samples."""

from lit_moe_rl.callbacks.export import HFExportCallback
from lit_moe_rl.callbacks.reference_kl import ReferenceKLCallback
from lit_moe_rl.callbacks.rollout import RolloutCallback
from lit_moe_rl.callbacks.router_shift import RouterShiftCallback
from lit_moe_rl.callbacks.samples import SampleTableCallback
from lit_moe_rl.callbacks.summary import RunSummary

__all__ = [
    "HFExportCallback",
    "ReferenceKLCallback",
    "RolloutCallback",
    "RouterShiftCallback",
    "RunSummary",
    "SampleTableCallback",
]
