"""Suite-wide settings: offline Hugging Face, and one intra-op thread.

Tiny models gain nothing from intra-op threads, and on a busy 2-core CPU OpenMP's spin-waiting makes
two threads 10x or more slower than one.
"""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch):
    """Tests call ``lit_moe_rl.cli.main([...])`` in-process: pytest's own arguments in ``sys.argv`` would
    make LightningCLI warn that both were given (a line on stderr a real run never prints)."""
    monkeypatch.setattr("sys.argv", ["lit-moe-rl"])
    # a config with seed_everything (quickstart: 0, quickstart_sft: 1) leaves PL_GLOBAL_SEED in the
    # environment; without this, a later run_fit would take that seed and results would depend on test order
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(autouse=True)
def no_runs_in_the_checkout(request):
    """A test writes its runs under tmp_path: a run folder that appears in the checkout's ``runs/`` (the
    CLI's default ``save_dir``, relative to the working directory) fails the test that made it."""
    from pathlib import Path

    runs = Path(__file__).resolve().parents[1] / "runs"
    before = set(runs.glob("*/*")) if runs.is_dir() else set()
    created = not runs.exists()
    yield
    after = set(runs.glob("*/*")) if runs.is_dir() else set()
    new = sorted(str(p) for p in after - before) or ([str(runs)] if created and runs.exists() else [])
    assert not new, f"{request.node.nodeid} wrote into the checkout's runs/: {new[:3]} (use tmp_path)"


@pytest.fixture
def restored_environ():
    """Lightning's ModelParallelStrategy sets MASTER_PORT & co. in os.environ: a later test's subprocess
    launching its own process group would inherit a port this process still listens on."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
