"""math-verify and wandb are imported only where used: the GPU image has neither, and a Countdown or
GPU-check run must start without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in ('math_verify', 'wandb', 'latex2sympy2_extended', 'antlr4')]; "


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_cli_and_the_rewards_import_without_math_verify_or_wandb():
    proc = _run(
        "import lit_moe_rl.cli, lit_moe_rl.rewards, lit_moe_rl.sft; from lit_moe_rl.cli import main; main(['fit', '--help'])"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_math_reward_needs_math_verify_only_when_called():
    proc = _run(
        "from lit_moe_rl.rewards.math import MathReward\n"
        "reward = MathReward()\n"
        "try:\n    reward('2', {'answer': '2'})\nexcept ImportError as err:\n    print('ImportError', err)\n"
    )
    assert proc.returncode == 0 and "ImportError" in proc.stdout, proc.stderr[-2000:]
