"""Write each recipe's memory plan (``lit-moe-rl plan``) into its header, between the
``plan-hardware:`` line and the first command line: ``python bench/plan_headers.py [--check]``.
``--check`` exits 1 when a header differs from the planner's output (tests/test_plan.py runs it)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_moe_rl.parallel.plan import format_plan  # noqa: E402
from lit_moe_rl.parallel.plan_cli import plan_file  # noqa: E402
from lit_moe_rl.parallel.plan_config import stated_hardware  # noqa: E402

MARK = "# plan-hardware:"


def recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*.yaml") if MARK in p.read_text())


def with_plan(path: Path) -> str:
    """The file's text with the plan's lines (commented) right after its plan-hardware line."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARK)) + 1
    end = start
    while end < len(lines) and lines[end].startswith("#|"):
        end += 1
    if end < len(lines) and lines[end] == "#@PLAN@":
        end += 1
    _, gpu_gib, host_gib = stated_hardware(path.read_text())  # not the GPU of the machine that runs this
    plan = format_plan(plan_file(str(path), gpu_gib=gpu_gib, host_gib=host_gib), f"configs/{path.name}")
    block = [f"#| {line}".rstrip() for line in plan.splitlines()]
    return "\n".join([*lines[:start], *block, *lines[end:]]) + "\n"


def main(check: bool) -> int:
    stale = []
    for path in recipes():
        text = with_plan(path)
        if text != path.read_text():
            stale.append(path.name)
            if not check:
                path.write_text(text)
    if check and stale:
        print(f"stale plans in the headers of: {', '.join(stale)} (run python bench/plan_headers.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main("--check" in sys.argv))
