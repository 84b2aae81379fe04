"""The package versions lit-moe-rl runs on, checked once at start-up with a one-line message."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# the lower bounds of pyproject.toml; transformers 5.17 is the GPU images' (the test suite passes on it)
MINIMUM = {"torch": "2.4", "transformers": "5.17", "lightning": "2.5"}


def unsupported_versions(minimum: dict[str, str] = MINIMUM) -> list[str]:
    """One message per missing package or one older than ``minimum`` (empty when all is well)."""
    problems = []
    for package, lowest in minimum.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            problems.append(f"{package} is not installed: lit-moe-rl needs {package}>={lowest}")
            continue
        if Version(installed).release < Version(lowest).release:
            problems.append(
                f"{package} {installed} is too old: lit-moe-rl needs {package}>={lowest} "
                f"(pip install '{package}>={lowest}')"
            )
    return problems
