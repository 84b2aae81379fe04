"""RunSummary: the held-out reward before and after training, and what a user checks first, printed at the end.

Besides the reward: the log folder, the run's time and steps, skipped updates (non-finite loss or
gradient), failed reward calls, and for runs that measure routing (R3 replay, RSPO / router-shift
tracking) the run means of the headline routing numbers (:data:`HEADLINE`). A resumed run's held-out
rewards, steps and skipped updates are the whole run's (from the checkpoint); its wall time, reward-call
counts and routing means are the session's, and the summary says "since resuming" where that matters.

Under several processes every figure is the whole run's: the held-out reward and the reward-call
counts are summed over ranks before they are printed or logged (each rank scores its own share).

Interruptions: on SIGTERM (a scheduler's stop) the run saves ``last.ckpt`` at the step it finished,
prints the summary and the command that resumes it, and the CLI exits 143; on Ctrl-C it says which
step the checkpoint it leaves holds (README "Many processes, resume, LoRA").
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_moe_rl.checkpoint import interrupted_lines, save_last_now
from lit_moe_rl.parallel.distributed import global_sums

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

    def __init__(self, validate_at_end: bool = True) -> None:
        """
        Args:
            validate_at_end: Validate after the last optimizer step (``trainer.max_steps``) when the
                validation interval does not land on it, as verl does, so that the run's last
                ``val/reward`` (and the summary's end) is the policy it ends with. Lightning validates the
                step on which ``trainer.should_stop`` is set, unless ``check_val_every_n_epoch`` skips the
                epoch or ``min_steps``/``min_epochs`` are not met; without validation data nothing runs.
        """
        self.validate_at_end = validate_at_end
        self.history: list[tuple[int, float]] = []
        self._sums = torch.zeros(2, dtype=torch.float64)
        self._t0 = 0.0
        self.first_step = 0  # the optimizer step this session started at (> 0: resumed from a checkpoint)
        self.headline: dict[str, list[float]] = {}
        self.command: list[str] | None = None  # the command line, for the resume hint (set by the CLI)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key in HEADLINE:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.headline.setdefault(key, []).append(float(value))
        if self.validate_at_end and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # the last step: Lightning validates it, then the run ends as it would

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = trainer.global_step  # restored by now

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
        total, count = global_sums(self._sums.tolist(), pl_module.device)  # every rank's share
        if count == 0:
            return
        reward = total / count
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            self.history[-1] = (step, reward)
        else:
            self.history.append((step, reward))
        if trainer.sanity_checking and trainer.logger is not None:
            trainer.logger.log_metrics({"val/reward": reward}, step=step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(self.full_summary(trainer, pl_module))

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM: save ``last.ckpt``, print the summary and how to resume. Ctrl-C: which step the
        checkpoint holds (no save: the step may be half done, and the other ranks may be gone)."""
        if trainer.state.fn != "fit":  # validate: nothing trained, nothing to save or resume
            return
        if isinstance(exception, SIGTERMException):
            save_last_now(trainer)
            summary = self.full_summary(trainer, pl_module)
            rank_zero_info(summary + "\n" + "\n".join(interrupted_lines(trainer, "SIGTERM", self.command)))
        elif isinstance(exception, KeyboardInterrupt):
            rank_zero_info("\n".join(interrupted_lines(trainer, "Ctrl-C", self.command)))

    def full_summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        lines = self.render(trainer.global_step, time.perf_counter() - self._t0)
        return lines + "\n" + "\n".join(self.run_lines(trainer, pl_module))

    def run_lines(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """Skipped updates, failed reward calls, routing headline means, and the log folder."""
        lines = [f"skipped updates: {getattr(getattr(pl_module, 'learner', None), 'skipped_steps', 0)}"]
        tracker = next(
            (getattr(cb, "failures", None) for cb in trainer.callbacks if hasattr(cb, "scorer")), None
        )
        if tracker is not None:
            failed, calls = global_sums([tracker.failed, tracker.calls], pl_module.device)
            since = " since resuming" if self.first_step else ""  # the callback's counts are this session's
            lines.append(f"failed reward calls: {failed:.0f} of {calls:.0f}{since} (scored 0)")
        routing = {k: v for k, v in self.headline.items() if not k.startswith("mismatch/")}
        if routing:
            shown = {**{k: v for k, v in self.headline.items() if k.startswith("mismatch/")}, **routing}
            lines.append(
                f"routing ({'mean since resuming' if self.first_step else 'run mean'}): "
                + "   ".join(f"{k} {sum(v) / len(v):.4g}" for k, v in shown.items())
            )
        lines.append(compute_line(pl_module))
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
        if self.first_step:
            lines.append(
                f"optimizer steps: {steps} ({steps - self.first_step} after resuming at step {self.first_step})"
                f"   wall time: {seconds:.1f} s since resuming"
            )
        else:
            lines.append(f"optimizer steps: {steps}   wall time: {seconds:.1f} s")
        return "\n".join(lines)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(item) for item in state_dict.get("history", [])]


def compute_line(pl_module: L.LightningModule) -> str:
    """How this run computed: torch's CPU threads (``--num_threads``), the experts kernel
    (``model.experts_implementation``), whether the update was compiled (``model.torch_compile``) and
    whether rows ran their shared prompt once (``model.shared_prefix``, and why not) and whether the
    experts skipped padding tokens (:func:`lit_moe_rl.experts.real_tokens_only`, and why not)."""
    from lit_moe_rl.experts import current_implementation

    policy = getattr(pl_module, "policy", None)
    experts = current_implementation(policy) if policy is not None else None
    compiled = bool(pl_module.hparams.get("torch_compile", False))
    learner = getattr(pl_module, "learner", None)
    off = learner.shared_prefix_off_reason() if learner is not None else "no learner"
    pads = learner.padding_skip_off_reason() if learner is not None else "no learner"
    return (
        f"compute: {torch.get_num_threads()} CPU thread(s), experts {experts or 'n/a (no experts interface)'}, "
        f"torch_compile {'on' if compiled else 'off'}, shared prompts {'on' if off is None else f'off ({off})'}, "
        f"padding skipped {'on' if pads is None else f'off ({pads})'}"
    )
