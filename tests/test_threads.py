"""The CLI's thread default: one thread on small machines, half the cores on large ones, OMP_NUM_THREADS wins."""

from __future__ import annotations

import pytest
import torch

from lit_moe_rl.cli.threads import apply_num_threads, auto_num_threads


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 1), (8, 4), (64, 32)])
def test_auto_threads_by_cores(monkeypatch, cores, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_num_threads(cores) == expected


def test_omp_num_threads_wins_over_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_num_threads(64) == 3


def test_apply_sets_torch_threads_and_refuses_negatives(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert apply_num_threads(0) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads: must be an integer >= 0"):
            apply_num_threads(-1)
    finally:
        torch.set_num_threads(before)
