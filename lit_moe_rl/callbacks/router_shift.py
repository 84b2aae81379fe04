"""RouterShiftCallback: watch RSPO's router shift, with or without the RSPO weighting.

RSPO (Zhang et al., arXiv 2510.23027 v2; docs/algorithms.md §4.2, §4.5) measures how far the router's
log-probabilities at the experts θ_old activated have moved in each update. The module computes it
(``rspo/*``, :func:`lit_moe_rl.routing.shift.router_shift`) whenever ``model.track_router_shift``
is on or the algorithm weights by it; this callback turns tracking on for any algorithm (so a GRPO
or GMPO run shows the drift RSPO would damp, while its loss stays exactly the base objective) and
adds two views:

* a layer x step heatmap of the per-layer shift ``rspo/layer_shift/<l>`` (the mean over a rollout's
  response tokens and mini-batches of ``d_l = mean_k |log r_θ - log r_old|``), a PNG under
  ``<log_dir>/router_shift/`` every ``every_n_steps`` optimizer steps and at the end of fit, and as
  ``rspo/layer_shift_heatmap`` on a WandbLogger;
* ``routing/expert_load_entropy/<l>``: the normalised entropy of layer l's expert-selection histogram
  over the old top-K of the rollout's response tokens (:func:`lit_moe_rl.metrics.expert_load_entropy`;
  1 = balanced, 0 = one expert takes all). Not a paper metric: a load-balance diagnostic.

The old top-K ids are read from the update micro-batches (through the module's forward context):
every row of the rollout is trained exactly once per rollout, and ``batch["rollout"]`` itself does
not carry them (the module fills a device copy of it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lit_moe_rl.callbacks.plots import layer_step_heatmap
from lit_moe_rl.metrics import expert_load_entropy
from lit_moe_rl.routing.adapters import moe_layout
from lit_moe_rl.routing.checks import require_moe

LAYER_SHIFT_PREFIX = "rspo/layer_shift/"
HEATMAP_KEY = "rspo/layer_shift_heatmap"
_LAYER_KEY = re.compile(re.escape(LAYER_SHIFT_PREFIX) + r"(\d+)$")


class RouterShiftCallback(Callback):
    """Tracks RSPO's router shift for any algorithm; heatmaps it per layer; logs expert-load entropy."""

    def __init__(self, every_n_steps: int = 10, heatmap: bool = True, log_expert_load: bool = True) -> None:
        """
        Args:
            every_n_steps: Write the layer x step heatmap every this many optimizer steps
                (``trainer.global_step``; a rollout with ``mini_batches: N`` is N steps); one more
                is written at the end of fit.
            heatmap: Write the heatmap PNG (and log it to W&B when a WandbLogger is attached).
            log_expert_load: Log ``routing/expert_load_entropy/<l>`` every step.
        """
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"router_shift.every_n_steps: must be an int >= 1, got {every_n_steps!r}")
        for name, value in (("heatmap", heatmap), ("log_expert_load", log_expert_load)):
            if not isinstance(value, bool):
                raise ValueError(f"router_shift.{name}: must be true or false, got {value!r}")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.log_expert_load = log_expert_load
        self.steps: list[int] = []  # optimizer step at the end of each recorded rollout
        self.columns: list[list[float]] = []  # per recorded rollout: mean shift d_l of each layer
        self.last_heatmap_step = 0
        self._num_experts = 0
        self._hooked_module: int | None = None
        self._old_topk: list[torch.Tensor] = []
        self._old_valid: list[torch.Tensor] = []

    # ----------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "add_forward_context"):
            raise ValueError(
                f"router_shift: RouterShiftCallback needs lit_moe_rl's MoERLModule, got {type(pl_module).__name__}"
            )
        pl_module.hparams.track_router_shift = True  # read by configure_model (require_moe) and the forwards
        if self.log_expert_load and self._hooked_module != id(pl_module):
            pl_module.add_forward_context(self._collect_old_topk)
            self._hooked_module = id(pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # configure_model already fails on a dense model once tracking is on; this also covers a
        # policy that was loaded before setup turned tracking on
        require_moe(pl_module.policy, "router_shift")
        self._num_experts = moe_layout(pl_module.policy)[2]

    @contextlib.contextmanager
    def _collect_old_topk(self, phase: str, micro: Any) -> Iterator[None]:
        """Forward context: keep the old top-K ids of each update micro-batch (each row once per rollout)."""
        if phase == "update" and micro.old_topk is not None:
            self._old_topk.append(micro.old_topk)
            self._old_valid.append(micro.response_mask.to(micro.old_topk.device))
        yield

    # ------------------------------------------------------------------ steps
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._old_topk.clear()
        self._old_valid.clear()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None or rollout.num_sequences == 0:  # nothing trained: the rspo/ metrics are stale
            return
        column = layer_shift_column(trainer.callback_metrics)
        if column:
            self.steps.append(trainer.global_step)
            self.columns.append(column)
        if self.log_expert_load and self._old_topk:
            entropy = expert_load_entropy(
                torch.cat(self._old_topk), self._num_experts, valid=torch.cat(self._old_valid)
            )
            metrics = {f"routing/expert_load_entropy/{layer}": value for layer, value in enumerate(entropy)}
            log = getattr(pl_module, "log_reduced", None)  # reduced across ranks
            log(metrics) if log else pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._old_topk.clear()
        self._old_valid.clear()
        if (
            self.heatmap
            and trainer.global_step // self.every_n_steps > self.last_heatmap_step // self.every_n_steps
        ):
            self.write_heatmap(trainer)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.heatmap and self.steps and self.steps[-1] > self.last_heatmap_step:
            self.write_heatmap(trainer)

    # --------------------------------------------------------------- heatmap
    def heatmap_dir(self, trainer: L.Trainer) -> Path:
        """``<trainer.log_dir or default_root_dir>/router_shift`` (call on every rank: log_dir broadcasts)."""
        return Path(trainer.log_dir or trainer.default_root_dir) / "router_shift"

    def write_heatmap(self, trainer: L.Trainer) -> Path | None:
        """Write ``heatmap_step<k>.png`` of all recorded steps (rank 0) and log it to W&B loggers."""
        folder = self.heatmap_dir(trainer)
        step = trainer.global_step
        self.last_heatmap_step = step
        if not trainer.is_global_zero or not self.columns:
            return None
        path = layer_step_heatmap(
            self.matrix(),
            self.steps,
            folder / f"heatmap_step{step}.png",
            title="RSPO router shift per MoE layer",
            colorbar_label="mean |Δ log r| at old top-K",
            xlabel="optimizer step",
        )
        logger_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step scalars are logged at
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=HEATMAP_KEY, images=[str(path)], step=logger_step)
        return path

    def matrix(self) -> np.ndarray:
        """Layer x recorded-step matrix ``[L, S]`` of mean shifts (NaN where a layer had no value)."""
        num_layers = max((len(c) for c in self.columns), default=0)
        out = np.full((num_layers, len(self.columns)), np.nan)
        for j, column in enumerate(self.columns):
            out[: len(column), j] = column
        return out

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "columns": [list(c) for c in self.columns],
            "last_heatmap_step": self.last_heatmap_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.columns = [[float(v) for v in c] for c in state_dict.get("columns", [])]
        self.last_heatmap_step = int(state_dict.get("last_heatmap_step", 0))


def layer_shift_column(metrics: dict[str, Any]) -> list[float]:
    """``[d_0, d_1, ...]`` from the logged ``rspo/layer_shift/<l>`` scalars ([] when none is logged)."""
    found = {int(m.group(1)): float(v) for k, v in metrics.items() if (m := _LAYER_KEY.match(k))}
    return [found.get(layer, float("nan")) for layer in range(max(found) + 1)] if found else []
