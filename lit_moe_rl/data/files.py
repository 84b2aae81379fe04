"""Prompt files: JSON Lines or Parquet, one prompt row per line / table row, or a Hugging Face ``datasets``
folder written by ``Dataset.save_to_disk`` (read with pyarrow from its Arrow shards; ``datasets`` is not needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_prompt_file(
    path: str | Path, *, prompt_key: str = "prompt", setting: str = "data.path"
) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.json`` (JSON Lines, or one JSON array) or ``.parquet`` file, or of a
    ``datasets`` folder (``Dataset.save_to_disk``; a ``DatasetDict`` folder is an error naming its splits).

    Every row must have ``prompt_key``; all other columns are kept as they are (numpy / pyarrow
    values become plain Python: lists, ints, floats, strings, dicts). ``setting`` names the option
    in error messages.

    Raises:
        FileNotFoundError: the file or folder does not exist (one line naming ``setting``).
        ValueError: unknown extension, a folder that is not a saved ``Dataset``, a line that is not a JSON object, or a row without
            ``prompt_key`` (naming the file, the 1-based line / row number and the key).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{setting}: no such file '{path}'")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows, unit = _read_saved_dataset(path, setting), "row"
    elif suffix == ".json" and _starts_with(path, "["):
        rows, unit = _read_json_array(path, setting), "item"
    elif suffix in (".jsonl", ".json"):
        rows, unit = _read_jsonl(path, setting), "line"
    elif suffix == ".parquet":
        rows, unit = _read_parquet(path), "row"
    else:
        raise ValueError(f"{setting}: '{path}' is not .jsonl, .json, .parquet or a datasets folder")
    for number, row in rows:
        if prompt_key not in row:
            raise ValueError(f"{setting}: '{path}' {unit} {number} has no {prompt_key!r} field")
    return [row for _, row in rows]


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-blank character of a text file is ``char``."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith(char)
    return False


def _read_json_array(path: Path, setting: str) -> list[tuple[int, dict[str, Any]]]:
    """``(1-based item number, object)`` for each item of a file holding one JSON array."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{setting}: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{setting}: '{path}' item {number} is not a JSON object")
    return list(enumerate(items, start=1))


def _read_jsonl(path: Path, setting: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{setting}: '{path}' line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{setting}: '{path}' line {number} is not a JSON object")
            rows.append((number, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(row number, row)`` for each row of a Parquet file, values as plain Python."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [(number, row) for number, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path, setting: str) -> list[tuple[int, dict[str, Any]]]:
    """``(row number, row)`` of a ``Dataset.save_to_disk`` folder: its Arrow stream shards, in the order
    ``state.json`` lists them (``save_to_disk`` writes selected/shuffled rows already in order)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        hint = ", ".join(f"'{path / split}'" for split in splits)
        raise ValueError(f"{setting}: '{path}' holds a DatasetDict; point at one split folder: {hint}")
    if not (path / "state.json").is_file():
        raise ValueError(
            f"{setting}: '{path}' is a folder without state.json (not a Dataset.save_to_disk folder)"
        )
    shards = [entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    tables = []
    for shard in shards:
        with pa.memory_map(str(path / shard)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    rows = [row for table in tables for row in table.to_pylist()]
    return list(enumerate(rows, start=1))
