"""RunSummary: the held-out reward before and after training, and what a user checks first, printed at the end.

Besides the reward: the log folder, the run's time and steps, skipped updates (non-finite loss or
gradient), failed reward calls, and for runs that measure routing (R3 replay, RSPO / router-shift
tracking) the run means of the headline routing numbers (:data:`HEADLINE`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

HEADLINE = (
    "mismatch/train_infer_kl",
    "routing/rollout_train_router_disagreement",
    "routing/replay_native_router_disagreement",
    "rspo/gamma_mean",
    "rspo/floor_frac",
    "rspo/shift_mean",
)
"""Per-step metrics averaged over the run for the summary (shown when a routing metric was logged)."""


class RunSummary(Callback):
    """Records ``val/reward`` at the sanity check (step 0) and after each validation; prints a summary.

    The sanity-check validation (``trainer.num_sanity_val_steps: -1`` runs all of it) is the
    pre-training baseline: it is logged as ``val/reward`` at step 0, which Lightning itself does not do.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []
        self._sums = torch.zeros(2, dtype=torch.float64)
        self._t0 = 0.0
        self.headline: dict[str, list[float]] = {}

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key in HEADLINE:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.headline.setdefault(key, []).append(float(value))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums.zero_()

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        rewards = batch["val_rewards"].detach().double().cpu()
        self._sums += torch.tensor([float(rewards.sum()), rewards.numel()], dtype=torch.float64)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sums[1] == 0:
            return
        reward = float(self._sums[0] / self._sums[1])
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            self.history[-1] = (step, reward)
        else:
            self.history.append((step, reward))
        if trainer.sanity_checking and trainer.logger is not None:
            trainer.logger.log_metrics({"val/reward": reward}, step=step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = self.render(trainer.global_step, time.perf_counter() - self._t0)
        lines += "\n" + "\n".join(self.run_lines(trainer, pl_module))
        rank_zero_info(lines)

    def run_lines(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """Skipped updates, failed reward calls, routing headline means, and the log folder."""
        lines = [f"skipped updates: {getattr(pl_module, 'skipped_steps', 0)}"]
        tracker = next(
            (getattr(cb, "failures", None) for cb in trainer.callbacks if hasattr(cb, "scorer")), None
        )
        if tracker is not None:
            lines.append(f"failed reward calls: {tracker.failed} of {tracker.calls} (scored 0)")
        routing = {k: v for k, v in self.headline.items() if not k.startswith("mismatch/")}
        if routing:
            shown = {**{k: v for k, v in self.headline.items() if k.startswith("mismatch/")}, **routing}
            lines.append(
                "routing (run mean): " + "   ".join(f"{k} {sum(v) / len(v):.4g}" for k, v in shown.items())
            )
        lines.append(f"logs: {trainer.log_dir or trainer.default_root_dir}")
        return lines

    def render(self, steps: int, seconds: float) -> str:
        lines = ["", "== lit-moe-rl run summary =="]
        if self.history:
            (s0, r0), (s1, r1) = self.history[0], self.history[-1]
            best_step, best = max(self.history, key=lambda item: item[1])
            lines += [
                f"val/reward start: {r0:.3f} (step {s0})",
                f"val/reward end:   {r1:.3f} (step {s1})   change: {r1 - r0:+.3f}",
                f"val/reward best:  {best:.3f} (step {best_step})",
            ]
        else:
            lines.append("val/reward: no validation ran")
        lines.append(f"optimizer steps: {steps}   wall time: {seconds:.1f} s")
        return "\n".join(lines)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(item) for item in state_dict.get("history", [])]
