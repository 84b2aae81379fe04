"""The package layout keeps its layers apart: the learner runs without Lightning, nothing below the
command line imports it (no ``cli`` <-> ``sft`` circle), and every package says its job."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import lit_moe_rl
from tests.helpers import ROOT


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_learner_imports_no_lightning():
    loaded = loaded_after("import lit_moe_rl.learner")
    assert not {m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning")}


def test_nothing_below_the_command_line_imports_it():
    loaded = loaded_after("import lit_moe_rl.sft, lit_moe_rl.module, lit_moe_rl.callbacks")
    assert not {m for m in loaded if m.startswith("lit_moe_rl.cli")}


def test_every_package_has_a_docstring():
    packages = [lit_moe_rl] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(lit_moe_rl.__path__, "lit_moe_rl.")
        if info.ispkg and not info.name.endswith("assets")
    ]
    assert {"lit_moe_rl.cli", "lit_moe_rl.learner", "lit_moe_rl.parallel"} <= {p.__name__ for p in packages}
    assert not [p.__name__ for p in packages if not (p.__doc__ or "").strip()]
