"""The CLI's torch CPU thread count (``--num_threads``) and OpenMP's wait policy.

torch's default (one intra-op thread per core) is fragile for the small models this trainer runs on CPU
on a shared machine: an OpenMP thread that finishes its share of a parallel region spins (GNU libgomp:
``GOMP_SPINCOUNT``, 300,000 polls by default) waiting for the others, and when other processes hold the
cores the thread it waits for is not running (the quickstart: 3.0 s/step on average on a loaded 2-core
machine, against 0.27 with one thread; README "Threads"). Each remedy is an :class:`AutoRule` for
``--num_threads 0``:

* ``all-cores-short-spin`` (the default): every core, ``GOMP_SPINCOUNT=1000`` (a waiting thread polls
  briefly, then sleeps): idle within 3% of libgomp's default spin, and under load as fast as one thread
  (``bench/threads.py``);
* ``one-thread-small``: 1 thread on machines with at most 4 cores, half the cores above (the fallback);
* ``all-cores-passive``: every core, with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once:
  the OpenMP spec's wait policy; libgomp then sets its spin count to 0); safe, but 13% slower idle.

libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when it loads, which is at ``import torch``
(torch links libgomp; ``torch.__config__.parallel_info()``): setting them later in the process has no
effect. So :func:`prepare_openmp_env` runs when ``lit_moe_rl.cli`` is imported, before anything imports
torch, and a rule's thread count applies only when its environment was in place before torch loaded.
``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``, when the user sets them, win over any
rule: a user's ``OMP_WAIT_POLICY=PASSIVE`` is ``all-cores-passive``'s environment, so every core; any other
wait setting of the user's gets ``one-thread-small``'s count, said in one line on stderr (as does a rule
whose environment came after torch loaded, silently: a Python caller that imported torch first), since a
long spin on every core is what collapses under load. ``LIT_MOE_RL_AUTO_THREADS=<rule>`` picks a rule for one run
(``bench/threads.py`` times them); :data:`AUTO_RULE` is the default.

This module imports torch only inside :func:`apply_num_threads`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from lit_moe_rl.errors import SettingsError

RULE_VAR = "LIT_MOE_RL_AUTO_THREADS"  # picks an AutoRule for one run
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # libgomp reads them when it loads (import torch)


SHORT_SPIN = "1000"  # libgomp's polls before a waiting thread sleeps (its default: 300,000)


@dataclass(frozen=True)
class AutoRule:
    """What ``--num_threads 0`` picks: a thread count from the core count, and the OpenMP environment it
    needs in place before torch loads (empty: none)."""

    count: Callable[[int], int]
    env: dict[str, str] = field(default_factory=dict)


def half_above_four(cores: int) -> int:
    """1 thread on <= 4 cores, else ``cores // 2``."""
    return 1 if cores <= 4 else cores // 2


AUTO_RULES = {
    "one-thread-small": AutoRule(half_above_four),
    "all-cores-passive": AutoRule(lambda cores: cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "all-cores-short-spin": AutoRule(lambda cores: cores, {"GOMP_SPINCOUNT": SHORT_SPIN}),
}
# bench/threads.py, README "Threads": near the best idle, no collapse loaded
AUTO_RULE = "all-cores-short-spin"
FALLBACK_RULE = "one-thread-small"  # the count when a rule's environment came too late (torch already loaded)

_env_at_torch_load: dict[str, str | None] | None = None  # WAIT_VARS as libgomp read them (None: unknown)


def chosen_rule(environ: MutableMapping[str, str] | None = None) -> str:
    """The rule's name: ``LIT_MOE_RL_AUTO_THREADS`` when set, else :data:`AUTO_RULE` (not checked here)."""
    environ = os.environ if environ is None else environ
    return environ.get(RULE_VAR, "").strip() or AUTO_RULE


def prepare_openmp_env(
    environ: MutableMapping[str, str] | None = None, torch_loaded: bool | None = None
) -> dict:
    """Put the chosen rule's OpenMP environment into ``environ`` (``os.environ``) if torch has not loaded yet
    and the user set none of ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``; returns what it set. Never raises
    (it runs at import): an unknown rule is refused later, by :func:`apply_num_threads`."""
    global _env_at_torch_load
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    if torch_loaded:
        return {}
    rule = AUTO_RULES.get(chosen_rule(environ))
    user_set = any(environ.get(k) for k in WAIT_VARS)
    added = {} if rule is None or user_set else dict(rule.env)
    environ.update(added)
    _env_at_torch_load = {k: environ.get(k) for k in WAIT_VARS}
    return added


def check_thread_env(environ: MutableMapping[str, str] | None = None) -> None:
    """One line (:class:`SettingsError`) for an unknown rule, an ``OMP_WAIT_POLICY`` other than ACTIVE /
    PASSIVE, or an ``OMP_NUM_THREADS`` that is not a list of integers >= 1 (libgomp would only warn)."""
    environ = os.environ if environ is None else environ
    rule = chosen_rule(environ)
    if rule not in AUTO_RULES:
        raise SettingsError(f"{RULE_VAR}: unknown rule {rule!r}; choose one of {', '.join(AUTO_RULES)}")
    policy = environ.get("OMP_WAIT_POLICY", "")
    if policy and policy.strip().upper() not in ("ACTIVE", "PASSIVE"):
        raise SettingsError(f"OMP_WAIT_POLICY: must be ACTIVE or PASSIVE, got {policy!r}")
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp and not re.fullmatch(r"\s*0*[1-9]\d*\s*(,\s*0*[1-9]\d*\s*)*", omp):
        raise SettingsError(
            f"OMP_NUM_THREADS: must be an integer >= 1 (or a comma list of them), got {omp!r}"
        )


def rule_env_in_place(rule: AutoRule, at_load: dict[str, str | None] | None) -> bool:
    """Whether libgomp loaded with ``rule``'s environment (``at_load``: WAIT_VARS then; None: unknown)."""
    if not rule.env:
        return True
    return at_load is not None and all((at_load.get(k) or "").upper() == v for k, v in rule.env.items())


def auto_num_threads(cores: int | None = None, environ: MutableMapping[str, str] | None = None) -> int:
    """Threads when ``--num_threads 0``: ``OMP_NUM_THREADS`` (its first entry) if set, else the chosen rule's
    count when its environment was in place before torch loaded, else that of a rule whose environment was
    (the user's ``OMP_WAIT_POLICY=PASSIVE``), else :data:`FALLBACK_RULE`'s, with a line on stderr when the
    user's own wait setting is why."""
    environ = os.environ if environ is None else environ
    env = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    name = chosen_rule(environ)
    name = name if name in AUTO_RULES else FALLBACK_RULE
    if rule_env_in_place(AUTO_RULES[name], _env_at_torch_load):
        return AUTO_RULES[name].count(cores)
    in_place = [r for r in AUTO_RULES.values() if r.env and rule_env_in_place(r, _env_at_torch_load)]
    if in_place:
        return in_place[0].count(cores)
    count = AUTO_RULES[FALLBACK_RULE].count(cores)
    users = ", ".join(f"{k}={v}" for k, v in (_env_at_torch_load or {}).items() if v)
    if users:  # the user's own wait setting overrode the rule's (silent when torch loaded first: README)
        print(
            f"lit-moe-rl: --num_threads 0: {count} thread(s) ({FALLBACK_RULE}): the {name} rule needs "
            f"{' '.join(f'{k}={v}' for k, v in AUTO_RULES[name].env.items())} before torch loads, you set "
            f"{users}; set OMP_NUM_THREADS or --num_threads to choose",
            file=sys.stderr,
        )
    return count


class ThreadCountError(argparse.ArgumentTypeError, ValueError):
    """A bad ``--num_threads``: argparse prints its message as is, a config file's loader sees a ValueError."""


def thread_count(value: Any) -> int:
    """``--num_threads``' parser type: an integer >= 0, refused while parsing (``--print_config`` too)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():  # "-1" is not all digits
        raise ThreadCountError(f"must be an integer >= 0 (0 = auto), got {value if text else repr(value)}")
    return int(text)


def apply_num_threads(num_threads: int, setting: str = "num_threads") -> int:
    """Set torch's intra-op threads (``num_threads`` >= 0; 0 = :func:`auto_num_threads`); returns the count."""
    import torch

    if not isinstance(num_threads, int) or num_threads < 0:
        raise SettingsError(f"{setting}: must be an integer >= 0 (0 = auto), got {num_threads!r}")
    check_thread_env()
    count = num_threads or auto_num_threads()
    torch.set_num_threads(count)
    return count
