"""The rollout callback's multi-turn side: settings checked at construction, metrics, marked transcripts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L

from lit_moe_rl.rollout.env import env_factory, import_path
from lit_moe_rl.rollout.env_workers import EnvPool
from lit_moe_rl.rollout.multiturn import TurnLimits
from lit_moe_rl.rollout.observations import check_template

__all__ = ["OBS_CLOSE", "OBS_OPEN", "MultiTurnSettings", "marked_transcripts", "multiturn_metrics"]

OBS_OPEN, OBS_CLOSE = "⟦", "⟧"  # observation spans in the samples table: attended, never trained


@dataclass
class MultiTurnSettings:
    """``rollout.env`` and its limits."""

    make_env: Any
    limits: TurnLimits

    @classmethod
    def make(
        cls,
        env: Any,
        engine: Any,
        max_turns: int,
        max_total_tokens: int | None,
        max_env_tokens: int,
        timeout_s: float,
        isolation: str = "auto",
        workers: int = 2,
    ) -> MultiTurnSettings:
        _check(max_turns >= 1, "max_turns", "must be >= 1", max_turns)
        _check(max_env_tokens >= 1, "max_env_tokens", "must be >= 1", max_env_tokens)
        _check(timeout_s > 0, "env_timeout_s", "must be > 0", timeout_s)
        if not hasattr(engine, "max_new_tokens"):
            raise ValueError("rollout.env: multi-turn rollouts need the HFEngine (rollout.engine)")
        budget = max_total_tokens if max_total_tokens is not None else max_turns * engine.max_new_tokens
        _check(budget >= 1, "max_total_tokens", "must be >= 1", budget)
        _check(
            isolation in ("auto", "process", "thread"),
            "env_isolation",
            "expected auto, process or thread",
            isolation,
        )
        _check(workers >= 1, "env_workers", "must be >= 1", workers)
        make_env = env_factory(env)
        if isolation == "auto":
            isolation = "thread" if getattr(_env_class(env, make_env), "thread_safe", False) else "process"
        if isolation == "process":
            make_env = EnvPool(env, workers)
        limits = TurnLimits(max_turns, budget, engine.max_new_tokens, max_env_tokens, timeout_s)
        return cls(make_env=make_env, limits=limits)

    def close(self) -> None:
        if isinstance(self.make_env, EnvPool):
            self.make_env.close()

    def check_tokenizer(self, tokenizer: Any) -> None:
        """At start-up: a chat template must be prefix-preserving (observations are its suffixes)."""
        if getattr(tokenizer, "chat_template", None):
            check_template(tokenizer)


def _env_class(spec: Any, make_env: Any) -> Any:
    if isinstance(spec, dict):
        return import_path(spec["class_path"])
    return make_env if isinstance(make_env, type) else None


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"rollout.{name}: {rule}, got {value!r}")


def multiturn_metrics(gen: Any) -> dict[str, float]:
    """``multiturn/*`` scalars: turns, observation-token share, environment errors, timeouts and cut-offs."""
    trajs = gen.trajectories
    real = gen.attention_mask[:, gen.prompt_len :].bool()
    observed = float((real & ~gen.response_mask).sum())
    return {
        "multiturn/turns": sum(t.turns for t in trajs) / len(trajs),
        "multiturn/obs_token_share": observed / max(float(real.sum()), 1.0),
        "multiturn/env_errors": float(sum(t.env_errors for t in trajs)),
        "multiturn/env_timeouts": float(sum(t.env_timeouts for t in trajs)),
        "multiturn/budget_cutoff_frac": sum(t.truncated for t in trajs) / len(trajs),
        "multiturn/obs_cut": float(sum(t.obs_cut for t in trajs)),
    } | env_metrics(trajs)


class ValMultiturn:
    """Held-out ``val/multiturn/turns`` and ``val/multiturn/env/<name>``, each averaged over the
    trajectories it applies to (``second_after_fail`` is then a share of failed first attempts), over
    a whole validation. The sanity check's values (before training) are written at step 0, as the run
    summary writes ``val/reward``."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, gen: Any) -> None:
        for traj in gen.trajectories:
            self._add("val/multiturn/turns", traj.turns)
            report = traj.env.metrics() if callable(getattr(traj.env, "metrics", None)) else {}
            for name, value in report.items():
                if value is not None:
                    self._add(f"val/multiturn/env/{name}", value)

    def _add(self, name: str, value: float) -> None:
        total = self.sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value)
        total[1] += 1.0

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        means = {name: total / count for name, (total, count) in self.sums.items() if count}
        self.sums = {}
        if trainer.sanity_checking:
            if trainer.logger is not None and means:
                trainer.logger.log_metrics(means, step=trainer.global_step)
            return
        for name, value in means.items():
            pl_module.log(name, value, sync_dist=True)


def env_metrics(trajs: list[Any]) -> dict[str, float]:
    """``multiturn/env/<name>``: the mean over trajectories of each value an environment's optional
    ``metrics()`` reports (None: not applicable to that trajectory, left out of the mean)."""
    values: dict[str, list[float]] = {}
    for traj in trajs:
        report = traj.env.metrics() if callable(getattr(traj.env, "metrics", None)) else {}
        for name, value in report.items():
            if value is not None:
                values.setdefault(name, []).append(float(value))
    return {f"multiturn/env/{name}": sum(v) / len(v) for name, v in values.items()}


def marked_transcripts(gen: Any, tokenizer: Any) -> list[str]:
    """Each trajectory's text after the prompt with its observation spans wrapped in ``⟦ ⟧``."""
    out = []
    for row, traj in enumerate(gen.trajectories):
        sampled = gen.response_mask[row, : len(traj.tokens)].tolist()
        parts, start = [], 0
        for end in range(1, len(traj.tokens) + 1):
            if end == len(traj.tokens) or sampled[end] != sampled[start]:
                text = tokenizer.decode(traj.tokens[start:end], skip_special_tokens=True)
                parts.append(text if sampled[start] else f"{OBS_OPEN}{text}{OBS_CLOSE}")
                start = end
        out.append("".join(parts))
    return out
