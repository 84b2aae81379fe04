"""The pure-Python wheels a lent GPU machine lacks, fetched here and installed there offline.

The GPU image has torch, transformers, lightning / pytorch-lightning, peft, torchmetrics, safetensors,
pyyaml, rich, matplotlib, pyarrow and jinja2 (:data:`IMAGE_PACKAGES`, with their own dependencies) and
no network. What lit-moe-rl needs beyond them (its ``pyproject.toml`` dependencies, extras included,
minus ``wandb``, which is imported only by a W&B logger) is computed from the installed metadata:
jsonargparse with docstring_parser and typeshed_client, math-verify with latex2sympy2_extended and
antlr4-python3-runtime, about 1.4 MB of ``py3-none-any`` wheels pinned to the versions installed here.

* :func:`download` (``bench/gpu_check.py --wheels DIR``, here, with PyPI): ``pip download`` them;
* :func:`install` (``bench/gpu_check.py --install DIR``, on the GPU): ``pip install --no-index`` of those
  the image lacks, into site-packages or, when that fails (read-only), ``--target`` a folder that goes
  first on ``sys.path`` and on the children's ``PYTHONPATH``;
* :func:`image_venv`: a virtual environment that holds only the image's packages (symlinked from this
  interpreter's site-packages, no system site) and pip, for a CPU rehearsal of the whole sequence.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = (
    "torch", "transformers", "lightning", "pytorch-lightning", "peft", "torchmetrics", "safetensors",
    "pyyaml", "rich", "matplotlib", "pyarrow", "jinja2", "pip",
)  # fmt: skip
NOT_CARRIED = ("wandb",)  # imported only where used (a WandbLogger); the GPU check logs to CSV


def closure(specs: list[str]) -> dict[str, set[str]]:
    """``{canonical name: extras}`` of the installed distributions ``specs`` need, recursively
    (markers evaluated for this interpreter and each requested extra)."""
    seen: dict[str, set[str]] = {}
    stack = [Requirement(spec) for spec in specs]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        extras = seen.setdefault(name, set())
        extras.update(req.extras)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here (an optional platform dependency): nothing to follow
        for text in requires:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                stack.append(dep)
    return seen


def project_requirements() -> list[str]:
    """``pyproject.toml``'s dependencies, without :data:`NOT_CARRIED` (Python >= 3.11: run it here)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(Requirement(d).name) not in NOT_CARRIED]


def needed() -> list[tuple[str, str]]:
    """``(name, version)`` of the distributions lit-moe-rl needs that the GPU image lacks, pinned to
    the versions installed here (the ones the tests ran with)."""
    missing = sorted(set(closure(project_requirements())) - set(closure(list(IMAGE_PACKAGES))))
    return [(name, md.version(name)) for name in missing]


def download(dest: Path) -> list[Path]:
    """``pip download`` each :func:`needed` wheel into ``dest`` (kept ones are not fetched again);
    refuses a wheel that is not pure Python (the GPU image's Python and platform may differ)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, version in needed():
        found = _wheel_for(dest, name, version)
        if found is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(dest), f"{name}=={version}"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()
                raise RuntimeError(
                    f"pip download {name}=={version} failed: {tail[-1] if tail else proc.returncode}"
                )
            found = _wheel_for(dest, name, version)
        if found is None or not all(
            t.abi == "none" and t.platform == "any" for t in parse_wheel_filename(found.name)[3]
        ):
            raise RuntimeError(f"{name}=={version}: no pure-Python wheel ({found.name if found else 'none'})")
        wheels.append(found)
    return wheels


def _wheel_for(folder: Path, name: str, version: str) -> Path | None:
    for path in folder.glob("*.whl"):
        wheel_name, wheel_version, *_ = parse_wheel_filename(path.name)
        if wheel_name == canonicalize_name(name) and str(wheel_version) == version:
            return path
    return None


def install(folder: Path) -> Path | None:
    """Install offline the wheels in ``folder`` whose distribution this interpreter lacks.

    ``pip install --no-index --no-deps`` into site-packages; if that fails (a read-only image),
    ``--target`` a fresh folder (or, without a working pip, the wheels unzipped there), which is put
    first on ``sys.path`` and returned (the caller puts it on its children's ``PYTHONPATH``). Returns
    None when site-packages took them or nothing was missing.
    """
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"--install {folder}: no wheels there (run `python bench/gpu_check.py --wheels {folder}` first)"
        )
    missing = [w for w in wheels if not _installed(parse_wheel_filename(w.name)[0])]
    if not missing:
        return None
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    proc = subprocess.run([*base, *map(str, missing)], capture_output=True, text=True)
    target = None
    if proc.returncode != 0:
        target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        proc = subprocess.run(
            [*base, "--target", str(target), *map(str, missing)], capture_output=True, text=True
        )
        if proc.returncode != 0:  # no working pip: a pure-Python wheel is a zip of site-packages' layout
            for wheel in missing:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(target)
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return target


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def image_venv(folder: Path) -> Path:
    """A venv at ``folder`` that sees only :data:`IMAGE_PACKAGES` and their dependencies (symlinked from
    this interpreter's installs into ``folder/image``, listed by a ``.pth`` file; no system site,
    no user site, no pip of its own). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    image = folder / "image"
    image.mkdir()
    for name in closure(list(IMAGE_PACKAGES)):
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for top in _top_level_entries(dist):
            link = image / top.name
            if not link.exists():
                link.symlink_to(top)
    (site / "gpu_image.pth").write_text(str(image) + "\n")
    return python


def _top_level_entries(dist: md.Distribution) -> set[Path]:
    """The paths a distribution installed directly in its site-packages folder (packages, modules,
    extension libraries, its ``.dist-info``), from its RECORD."""
    base = Path(dist.locate_file(""))
    entries = set()
    for file in dist.files or []:
        first = Path(str(file)).parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        path = base / first
        if path.exists():
            entries.add(path)
    return entries


def pythonpath(*first: str | Path | None) -> str:
    """``PYTHONPATH`` for a child: ``first`` entries (skipping None), then the current value (kept)."""
    parts = [str(p) for p in first if p] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    return os.pathsep.join(dict.fromkeys(parts))
