"""Micro-batches grouped by length and trimmed of all-padding columns train exactly as untrimmed ones."""

from __future__ import annotations

import pytest
import torch

from lit_moe_rl.batch import Rollout
from lit_moe_rl.learner import learner as learner_lib
from lit_moe_rl.learner.batching import (
    forward_tokens,
    micro_plan,
    pad_columns,
    response_widths,
    scatter_rows,
    trim_padding,
)
from lit_moe_rl.parallel.distributed import Collectives
from tests.helpers import run_fit, train_rows
from tests.test_distributed_e2e import KEYS


def _rollout() -> Rollout:
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    prompt = torch.ones(3, 2, dtype=torch.long)
    return Rollout(
        input_ids=torch.arange(18).view(3, 6),
        attention_mask=torch.cat([prompt, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_len=2,
        group_size=3,
        temperature=1.0,
        rewards=torch.zeros(3),
        advantages=torch.arange(12.0).view(3, 4),  # token-level: trimmed too
        old_topk=torch.zeros(3, 4, 2, 1, dtype=torch.long),
    )


def test_trim_drops_only_columns_past_the_longest_response():
    micro = trim_padding(_rollout().select(torch.tensor([0, 1])))
    assert micro.input_ids.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert micro.response_mask.shape == (2, 2) and micro.advantages.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert micro.old_topk.shape == (2, 2, 2, 1) and micro.rewards.shape == (2,)
    full = _rollout().select(torch.tensor([2, 0]))
    assert trim_padding(full) is full  # nothing to drop


def test_widths_count_the_columns_trimming_keeps_observations_included():
    """Row 0 is a multi-turn row: sampled 1, observation 0 0 (attended, not in the response mask), sampled 1;
    row 1 sampled one token; row 2 none. The widths are what trim_padding keeps, not the sampled counts."""
    rollout = _rollout()
    rollout.response_mask = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    response_attended = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    rollout.attention_mask = torch.cat([torch.ones(3, 2, dtype=torch.long), response_attended], dim=1)
    assert response_widths(rollout).tolist() == [4, 1, 0]
    assert rollout.response_mask.sum(-1).tolist() == [2, 1, 0]  # the sampled counts would rank row 0 too low
    assert trim_padding(rollout.select(torch.tensor([0]))).response_len == 4


def test_plan_groups_rows_by_length_and_scatter_restores_the_order():
    lengths = torch.tensor([3, 1, 4, 1])
    plan = micro_plan(torch.arange(4), 2, Collectives(), lengths=lengths)
    assert [rows.tolist() for rows, _ in plan] == [[1, 3], [0, 2]]
    parts = [(rows, rows.float().view(-1, 1).expand(-1, 2)) for rows, _ in plan]
    assert scatter_rows(parts, 4, 3).tolist() == [[r, r, 0.0] for r in (0.0, 1.0, 2.0, 3.0)]
    assert pad_columns(torch.ones(1, 1), 3).tolist() == [[1.0, 0.0, 0.0]]


def test_plan_keeps_groups_together_where_that_runs_fewer_tokens():
    """Four groups of two rows, micro-batches of two. By length every micro-batch holds two groups' rows:
    8 prompt runs and responses padded to 2, 4, 6, 8. By group: 4 prompt runs, padded to 5, 6, 7, 8
    (groups by their longest). Grouped wins when 4 P + 52 < 8 P + 40, i.e. P > 3."""
    lengths = torch.tensor([1, 8, 2, 7, 3, 6, 4, 5])
    groups = torch.arange(8) // 2
    by_length, by_group = [[0, 2], [4, 6], [7, 5], [3, 1]], [[6, 7], [4, 5], [2, 3], [0, 1]]
    for prompt_len, want in ((10, by_group), (2, by_length), (3, by_length)):  # P = 3: a tie keeps length
        plan = micro_plan(
            torch.arange(8), 2, Collectives(), lengths=lengths, groups=groups, prompt_len=prompt_len
        )
        assert [rows.tolist() for rows, _ in plan] == want, prompt_len
    assert forward_tokens(torch.tensor([0, 2, 4, 6, 7, 5, 3, 1]), lengths, groups, 10, 2) == 8 * 10 + 40
    assert forward_tokens(torch.tensor([6, 7, 4, 5, 2, 3, 0, 1]), lengths, groups, 10, 2) == 4 * 10 + 52
    # a mini-batch's rows (here groups 1 and 3 only) are planned among themselves
    plan = micro_plan(
        torch.tensor([2, 3, 6, 7]), 2, Collectives(), lengths=lengths, groups=groups, prompt_len=10
    )
    assert [rows.tolist() for rows, _ in plan] == [[6, 7], [2, 3]]
    plan = micro_plan(
        torch.tensor([2, 3, 6, 7]), 2, Collectives(), lengths=lengths, groups=None, prompt_len=10
    )
    assert [rows.tolist() for rows, _ in plan] == [[2, 6], [7, 3]]  # without groups: by length


@pytest.mark.parametrize(
    "extra", [[], ["--model.mini_batches=2", "--model.algorithm=lit_moe_rl.algorithms.RSPO"]]
)
def test_trimmed_and_sorted_micro_batches_give_the_same_training(tmp_path, monkeypatch, extra):
    args = [  # the warm-started built-in model ends its answers at different lengths: columns to trim
        "--model.pretrained=builtin:countdown-tiny-moe", "--model.config=null", "--rollout.engine.max_new_tokens=12",
        "--model.micro_batch_size=3", "--trainer.limit_val_batches=0", "--model.lr=1e-5", *extra,
    ]  # fmt: skip
    # lr 1e-5: trimming changes the forward's shapes, so gradients differ by float rounding, and AdamW's
    # first step moves a weight by ~lr whatever |g| (above eps): at lr 1e-3 the weights differed enough
    # for a later rollout to sample another token (entropy 1e-4 apart at step 3)
    widths = []

    def spy(micro: Rollout) -> Rollout:
        trimmed = trim_padding(micro)
        widths.append((micro.response_len, trimmed.response_len))
        return trimmed

    monkeypatch.setattr(learner_lib, "trim_padding", spy)
    trimmed = train_rows(run_fit(tmp_path / "trim", *args, steps=4))
    plain = train_rows(run_fit(tmp_path / "plain", *args, "--model.trim_padding=false", steps=4))
    assert len(trimmed) == len(plain) >= 2
    assert any(after < before for before, after in widths)  # columns were dropped
    assert (
        sum(r["policy/grad_norm"] > 0 for r in plain) >= 2
    )  # updates happened: not a run of zero advantages
    for key in KEYS + [k for k in plain[0] if k.startswith("rspo/gamma")]:
        assert [r[key] for r in trimmed] == pytest.approx([r[key] for r in plain], rel=1e-5, abs=1e-6), key
