"""Data: the Countdown generator and templates, prompt files, and the DataModule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_moe_rl.data import (
    PromptDataModule,
    collate_prompts,
    format_completion,
    format_prompt,
    generate_countdown,
    load_prompt_file,
)
from lit_moe_rl.rewards import CountdownReward
from lit_moe_rl.rewards.arith import safe_eval

ROW = {"numbers": [3, 5, 7], "target": 22, "solution": "3*5+7"}


def test_generator_is_seeded() -> None:
    assert generate_countdown(50, seed=1) == generate_countdown(50, seed=1)
    assert generate_countdown(50, seed=1) != generate_countdown(50, seed=2)
    assert generate_countdown(20, seed=1) == generate_countdown(50, seed=1)[:20]


def test_generated_rows_are_solvable() -> None:
    rows = generate_countdown(500, seed=0, min_numbers=3, max_numbers=4, max_number=99)
    assert {len(r["numbers"]) for r in rows} == {3, 4}
    for row in rows:
        assert isinstance(row["target"], int) and 1 <= row["target"] <= 1000
        assert all(1 <= x <= 99 for x in row["numbers"])
        assert safe_eval(row["solution"]) == row["target"]
        assert sorted(int(x) for x in re.findall(r"\d+", row["solution"])) == sorted(row["numbers"])
        assert " " not in row["solution"]
        assert CountdownReward(format="plain")(row["solution"], row) == 1.0


def test_generator_settings() -> None:
    rows = generate_countdown(100, seed=3, min_numbers=2, max_numbers=2, max_number=9, ops="+", max_target=50)
    assert all(len(r["numbers"]) == 2 and r["target"] == sum(r["numbers"]) for r in rows)
    with pytest.raises(ValueError, match="data.min_numbers"):
        generate_countdown(1, seed=0, min_numbers=4, max_numbers=3)
    with pytest.raises(ValueError, match="ops"):
        generate_countdown(1, seed=0, ops="^")


def test_template_tinyzero_exact() -> None:
    assert format_prompt(ROW, "tinyzero") == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer.\nUser: Using the numbers [3, 5, 7], create an equation that equals 22. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in <think> "
        "</think> tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 "
        "</answer>.\nAssistant: Let me solve this step by step.\n<think>"
    )


def test_template_qwen_instruct_exact() -> None:
    assert format_prompt(ROW, "qwen-instruct") == (
        "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in the "
        "mind and then provides the user with the answer.<|im_end|>\n<|im_start|>user\n Using the numbers "
        "[3, 5, 7], create an equation that equals 22. You can use basic arithmetic operations (+, -, *, /) and "
        "each number can only be used once. Show your work in <think> </think> tags. And return the final answer "
        "in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n<|im_start|>assistant\n"
        "Let me solve this step by step.\n<think>"
    )


def test_template_compact_and_completions() -> None:
    assert format_prompt(ROW, "compact") == "3 5 7 => 22 ="
    assert format_completion(ROW, "compact") == "3*5+7"
    for template in ("tinyzero", "qwen-instruct"):
        completion = format_completion(ROW, template)
        assert CountdownReward()(completion, ROW) == 1.0
        assert CountdownReward()(format_prompt(ROW, template) + completion, ROW) == 1.0
    with pytest.raises(ValueError, match="data.template"):
        format_prompt(ROW, "alpaca")  # type: ignore[arg-type]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    return [
        {"prompt": f"q{i}", "answer": str(i), "meta": {"k": [i, i + 1]}, "numbers": [i, 2]} for i in range(n)
    ]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = _rows(3)
    assert load_prompt_file(_write_jsonl(tmp_path / "p.jsonl", rows)) == rows
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_prompt_file(tmp_path / "a.json") == rows


def test_parquet_round_trip(tmp_path: Path) -> None:
    rows = _rows(3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    loaded = load_prompt_file(tmp_path / "p.parquet")
    assert loaded == rows
    assert type(loaded[0]["numbers"]) is list and type(loaded[0]["numbers"][0]) is int


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^data.path: no such file"):
        load_prompt_file(tmp_path / "missing.jsonl")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(ValueError, match=r"p.jsonl' line 2 has no 'prompt' field"):
        load_prompt_file(path)
    with pytest.raises(ValueError, match=r"^data.val_path: .* line 2 has no 'question'"):
        load_prompt_file(
            _write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}, {}]),
            prompt_key="question",
            setting="data.val_path",
        )
    pq.write_table(pa.Table.from_pylist([{"q": "a"}]), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet' row 1 has no 'prompt' field"):
        load_prompt_file(tmp_path / "p.parquet")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(ValueError, match="not .jsonl"):
        load_prompt_file(tmp_path / "p.csv")


def test_datamodule_countdown_split_is_held_out() -> None:
    dm = PromptDataModule(
        template="compact", num_train=300, num_val=40, min_numbers=3, max_numbers=3, max_number=9
    )
    dm.setup("fit")
    assert dm.train_rows is not None and dm.val_rows is not None
    assert len(dm.train_rows) == 300 and len(dm.val_rows) == 40
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    train_keys = {key(r) for r in dm.train_rows}
    assert not train_keys & {key(r) for r in dm.val_rows}
    assert len({key(r) for r in dm.val_rows}) == 40
    assert all(r["prompt"] == format_prompt(r, "compact") for r in dm.train_rows + dm.val_rows)


def test_datamodule_batches() -> None:
    dm = PromptDataModule(num_train=20, num_val=5, batch_size=6, val_batch_size=4, seed=7)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # drop_last
    batch = batches[0]
    assert set(batch) == {"prompt", "samples"}
    assert len(batch["prompt"]) == 6 and all(isinstance(p, str) for p in batch["prompt"])
    assert [s["prompt"] for s in batch["samples"]] == batch["prompt"]
    assert {"numbers", "target", "solution"} <= set(batch["samples"][0])
    again = PromptDataModule(num_train=20, num_val=5, batch_size=6, val_batch_size=4, seed=7)
    again.setup()
    assert next(iter(again.train_dataloader())) == batch  # seeded shuffle
    val = list(dm.val_dataloader())
    assert [len(b["prompt"]) for b in val] == [4, 1]
    assert [s for b in val for s in b["samples"]] == dm.val_rows


def test_collate_copies_rows() -> None:
    rows = [dict(ROW, prompt="p")]
    batch = collate_prompts(rows)
    batch["samples"][0]["target"] = 0
    assert rows[0]["target"] == 22


def test_datamodule_file_source(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    )
    dm = PromptDataModule(source="file", path=str(path), prompt_key="question", num_val=3, batch_size=2)
    dm.setup()
    assert [r["prompt"] for r in dm.val_rows or []] == ["q7", "q8", "q9"]
    batch = next(iter(dm.train_dataloader()))
    assert all(s["answer"] == s["question"][1:] for s in batch["samples"])
    val_path = _write_jsonl(tmp_path / "val.jsonl", [{"question": "v", "answer": "0"}])
    dm = PromptDataModule(source="file", path=str(path), val_path=str(val_path), prompt_key="question")
    dm.setup()
    assert len(dm.train_rows or []) == 10 and len(dm.val_rows or []) == 1


def test_datamodule_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^data.path: required"):
        PromptDataModule(source="file")
    with pytest.raises(ValueError, match=r"^data.batch_size"):
        PromptDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"^data.num_val"):
        PromptDataModule(num_val=-1)
    with pytest.raises(FileNotFoundError, match=r"^data.path"):
        PromptDataModule(source="file", path=str(tmp_path / "none.jsonl")).setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"^data.path: .* has no rows"):
        PromptDataModule(source="file", path=str(empty)).setup()
    small = _write_jsonl(tmp_path / "small.jsonl", [{"prompt": "a"}] * 3)
    with pytest.raises(ValueError, match=r"^data.num_val: holding out 64 of the 3 rows"):
        PromptDataModule(source="file", path=str(small)).setup()
    with pytest.raises(ValueError, match=r"^data.batch_size: 8 is more than the 2 training rows"):
        PromptDataModule(source="file", path=str(small), num_val=1).setup()
    with pytest.raises(ValueError, match=r"^data.num_val: found only"):
        PromptDataModule(num_train=50, num_val=50, min_numbers=2, max_numbers=2, max_number=2).setup()


def _keys(rows: list[dict]) -> set:
    return {(tuple(sorted(r["numbers"])), r["target"]) for r in rows}


def test_validation_is_an_unbiased_sample_whatever_the_training_size() -> None:
    """Validation is drawn first (the first distinct instances of its own stream), so it does not
    depend on num_train; training avoids it. A small space must not tilt validation to rare instances."""
    small = dict(template="compact", min_numbers=3, max_numbers=3, max_number=20, max_target=100, num_val=64)
    a = PromptDataModule(num_train=100, **small)
    b = PromptDataModule(num_train=5000, **small)
    a.setup()
    b.setup()
    assert [r["prompt"] for r in a.val_rows] == [r["prompt"] for r in b.val_rows]
    assert not _keys(b.val_rows) & _keys(b.train_rows)
    assert len(b.train_rows) == 5000


def test_val_seed_lets_a_warm_start_share_the_held_out_prompts() -> None:
    small = dict(template="compact", min_numbers=3, max_numbers=3, max_number=20, max_target=100, num_val=32)
    rl = PromptDataModule(seed=0, num_train=200, **small)
    sft = PromptDataModule(seed=1, val_seed=0, num_train=2000, **small)
    rl.setup()
    sft.setup()
    assert [r["prompt"] for r in rl.val_rows] == [r["prompt"] for r in sft.val_rows]
    assert not _keys(rl.val_rows) & _keys(sft.train_rows)
    assert [r["prompt"] for r in rl.train_rows[:5]] != [r["prompt"] for r in sft.train_rows[:5]]


CHAT_ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1?"}],
        "answer": i + 1,
    }
    for i in range(6)
]


def test_saved_dataset_folder_round_trip(tmp_path: Path) -> None:
    """A real ``Dataset.save_to_disk`` folder (several shards, a shuffled selection) reads back row for row."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert load_prompt_file(tmp_path / "ds") == CHAT_ROWS
    picked = ds.shuffle(seed=0).select(range(4))
    picked.save_to_disk(str(tmp_path / "picked"))
    assert load_prompt_file(tmp_path / "picked") == picked.to_list()
    datasets.DatasetDict(train=ds, test=picked).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(
        ValueError, match=r"^data.path: .*DatasetDict; point at one split folder: .*dict/train'"
    ):
        load_prompt_file(tmp_path / "dict")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"^data.path: .* without state.json"):
        load_prompt_file(tmp_path / "empty_dir")


def test_datamodule_reads_a_saved_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "train"))
    dm = PromptDataModule(source="file", path=str(tmp_path / "train"), num_val=2, batch_size=2)
    dm.setup()
    assert [r["prompt"] for r in dm.val_rows or []] == [r["prompt"] for r in CHAT_ROWS[4:]]


def test_datamodule_passes_chat_message_prompts_through(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    dm = PromptDataModule(source="file", path=str(path), num_val=2, batch_size=2, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt"] == [CHAT_ROWS[0]["prompt"], CHAT_ROWS[1]["prompt"]]
    assert [s["answer"] for s in batch["samples"]] == [1, 2]
    assert next(iter(dm.val_dataloader()))["prompt"] == [r["prompt"] for r in CHAT_ROWS[4:]]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"content": "no role"}]}] * 4)
    with pytest.raises(ValueError, match=r"^data.path: .*bad.jsonl' row 1: 'prompt' message 0 is not"):
        PromptDataModule(source="file", path=str(bad), num_val=1, batch_size=1).setup()
    number = _write_jsonl(tmp_path / "number.jsonl", [{"prompt": 3}] * 4)
    with pytest.raises(ValueError, match=r"row 1: 'prompt' is a int, expected the prompt text or"):
        PromptDataModule(source="file", path=str(number), num_val=1, batch_size=1).setup()
