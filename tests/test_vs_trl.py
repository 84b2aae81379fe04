"""bench/vs_trl.py: its real-vocabulary tokenizer covers every id, and ``--quick`` runs both trainers
and prints each one's generation / update split (TRL is an optional extra: skipped without it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.vs_trl import ALPHABET, REAL_VOCAB, alphabet, parse_args
from lit_moe_rl.policy import char_tokenizer
from tests.helpers import ROOT


def test_real_vocab_tokenizer_has_one_character_per_id():
    chars = alphabet(REAL_VOCAB)
    assert len(chars) == len(set(chars)) == REAL_VOCAB - 4 and chars.startswith(ALPHABET)
    tok = char_tokenizer(chars)
    assert len(tok) == REAL_VOCAB
    ids = [5, 98, 99, 70_000, REAL_VOCAB - 1]
    text = tok.decode(ids)
    assert len(text) == len(ids) and tok(text, add_special_tokens=False)["input_ids"] == ids
    prompt = "Question 3: what is 3 + 9? Answer:"
    assert tok.decode(tok(prompt, add_special_tokens=False)["input_ids"]) == prompt


def test_rows_flag_is_checked():
    assert parse_args(["--rows", "vocab,threads1"]).rows == ["vocab", "threads1"]
    with pytest.raises(SystemExit):
        parse_args(["--rows", "threads3"])


def test_quick_prints_each_trainers_split():
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--quick", "--rows", "threads1", "--trl", "no-gc"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| both 1 thread [quick] |"))
    lit, trl, ratio = row.split("|")[2:5]
    for cell in (lit, trl):  # s/step (gen + update), the split adding up to the step
        step, split = cell.split("(")[:2]
        gen, update = (float(x) for x in split.split(")")[0].split("+"))
        assert abs(float(step) - (gen + update)) <= 0.011 and gen > 0 and update > 0, cell
    assert ratio.strip().startswith("ratio=")
    assert "lit-moe-rl           s/step=" in done.stdout and "TRL (no grad ckpt)   s/step=" in done.stdout
