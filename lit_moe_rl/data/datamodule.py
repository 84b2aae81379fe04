"""The prompt DataModule: synthetic Countdown or prompt files, batched as ``{"prompt", "samples"}``."""

from __future__ import annotations

from itertools import islice
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from lit_moe_rl.data.countdown import (
    TEMPLATES,
    check_settings,
    format_prompt,
    iter_countdown,
)
from lit_moe_rl.data.files import load_prompt_file
from lit_moe_rl.data.sampler import ResumableSampler
from lit_moe_rl.rollout.prompts import prompt_error

_VAL_DRAWS_PER_ROW = 200


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch ``{"prompt": list[str | list[dict]] [B], "samples": list[dict] [B]}``; each sample is a copy of
    its row. A prompt is its text or a list of chat messages, passed through as it is."""
    return {"prompt": [row["prompt"] for row in rows], "samples": [dict(row) for row in rows]}


class PromptDataModule(L.LightningDataModule):
    """Prompts for RL: synthetic Countdown, or rows of a JSONL, Parquet or ``datasets`` folder.

    A file source is a JSONL or Parquet file, or a Hugging Face ``datasets`` folder
    (``Dataset.save_to_disk``).

    Each batch is ``{"prompt": list[str | list[dict]], "samples": list[dict]}``: the prompts and the full
    rows (``prompt`` plus every other field, e.g. ``numbers``/``target``/``solution`` for Countdown
    or ``answer`` for math), which the reward function receives as ``sample``. Validation prompts
    are held out: Countdown draws them from a separate random stream and drops every (numbers,
    target) pair that occurs in training; a file source uses ``val_path`` or its last ``num_val``
    rows.

    Args:
        source: ``"countdown"`` generates instances; ``"file"`` reads ``path``.
        path: the training prompts when ``source=file``: a ``.jsonl``, ``.json`` or ``.parquet`` file, or a
            ``datasets`` folder written by ``Dataset.save_to_disk`` (one split).
        val_path: a separate validation file or folder; without it the last ``num_val`` rows of ``path``
            are held out.
        prompt_key: the field of a row holding the prompt (copied to ``prompt``): its text, or a list of chat
            messages ``[{"role": ..., "content": ...}]`` that the tokenizer's chat template renders.
        template: Countdown prompt template: ``tinyzero`` (TinyZero base prompt), ``qwen-instruct``
            (the same in ChatML) or ``compact`` (``"3 5 7 => 22 ="``, for character-level models).
        num_train: number of Countdown training instances.
        num_val: number of validation prompts (Countdown instances, or rows held out of ``path``).
        min_numbers: fewest numbers in a Countdown instance.
        max_numbers: most numbers in a Countdown instance.
        max_number: largest number in a Countdown instance (numbers are drawn from 1..max_number).
        max_target: largest Countdown target.
        batch_size: prompts per training step (each gets the rollout's group of completions).
        val_batch_size: prompts per validation batch.
        seed: seed of the Countdown generator and of the training-order shuffle.
        val_seed: seed of the held-out Countdown stream (default: ``seed``); a warm start trained on
            another ``seed`` keeps the same ``val_seed`` so it never sees the RL run's held-out prompts.
        shuffle: shuffle the training prompts every epoch.
    """

    def __init__(
        self,
        source: Literal["countdown", "file"] = "countdown",
        path: str | None = None,
        val_path: str | None = None,
        prompt_key: str = "prompt",
        template: Literal["tinyzero", "qwen-instruct", "compact"] = "tinyzero",
        num_train: int = 10000,
        num_val: int = 64,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 99,
        max_target: int = 1000,
        batch_size: int = 8,
        val_batch_size: int = 64,
        seed: int = 0,
        val_seed: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        _validate(locals())
        self.save_hyperparameters()
        self.source = source
        self.path = path
        self.val_path = val_path
        self.prompt_key = prompt_key
        self.template = template
        self.num_train = num_train
        self.num_val = num_val
        self.min_numbers = min_numbers
        self.max_numbers = max_numbers
        self.max_number = max_number
        self.max_target = max_target
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.val_seed = val_seed
        self.shuffle = shuffle
        self.train_rows: list[dict[str, Any]] | None = None
        self.sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None
        self.val_rows: list[dict[str, Any]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate or load the rows once (later calls do nothing)."""
        if self.train_rows is not None:
            return
        train, val = self._countdown_rows() if self.source == "countdown" else self._file_rows()
        if len(train) < self.batch_size:
            raise ValueError(
                f"data.batch_size: {self.batch_size} is more than the {len(train)} training rows "
                "(the last incomplete batch is dropped, so no step would run)"
            )
        self.train_rows, self.val_rows = train, val

    def train_dataloader(self) -> DataLoader:
        """Training prompts: shuffled by a seeded, resumable sampler; incomplete last batch dropped."""
        rows = self._require(self.train_rows)
        self.sampler = ResumableSampler(len(rows), seed=self.seed, shuffle=self.shuffle, **self._ranks())
        if len(self.sampler) < self.batch_size:
            raise ValueError(
                f"data.batch_size: {self.batch_size} prompts per rank is more than the {len(rows)} training rows "
                f"give each of the {self.sampler.num_replicas} ranks"
            )
        if self._resume is not None:
            self.sampler.resume_at(*self._resume)
            self._resume = None
        return DataLoader(
            rows,  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=collate_prompts,
            num_workers=0,
        )

    def _ranks(self) -> dict[str, int]:
        """``num_replicas``/``rank`` of the data-parallel group (each rank draws its own prompts)."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training rows actually trained on (Lightning prefetches one batch ahead)."""
        trainer = getattr(self, "trainer", None)
        if self.sampler is not None and trainer is not None and trainer.training:
            self.sampler.consumed += len(batch["prompt"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the data epoch and this rank's rows consumed in it (saved in
        Lightning checkpoints). Counted here, not from Lightning's loop progress, which resets at a
        resume and counts a ``max_steps``-stopped epoch as finished."""
        if self.sampler is None:
            return {}
        epoch, consumed = self.sampler.position()
        return {"epoch": epoch, "rows_consumed": consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = (state_dict["epoch"], state_dict["rows_consumed"])

    def val_dataloader(self) -> DataLoader:
        """Held-out prompts in a fixed order (empty when there are none)."""
        rows = self._require(self.val_rows)
        return DataLoader(
            rows,  # type: ignore[arg-type]
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=collate_prompts,
            num_workers=0,
        )

    def _require(self, rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """``rows``, or an error saying that ``setup()`` has not run."""
        if rows is None:
            raise RuntimeError("PromptDataModule: call setup() before asking for a dataloader")
        return rows

    def _countdown_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Held-out validation instances first, then training instances that avoid them.

        Validation is an i.i.d. sample of the generator's distribution (distinct instances from a
        separate stream); training draws from ``seed`` and skips every validation instance. The other
        way round (filtering validation against training) would bias validation towards rare, hard
        instances whenever training covers much of a small instance space.
        """
        settings = dict(
            min_numbers=self.min_numbers,
            max_numbers=self.max_numbers,
            max_number=self.max_number,
            max_target=self.max_target,
        )
        val_seed = self.seed if self.val_seed is None else self.val_seed
        val = _distinct(iter_countdown(seed=f"val-{val_seed}", **settings), self.num_val)
        held_out = {_instance_key(row) for row in val}
        rows = (
            row for row in iter_countdown(seed=self.seed, **settings) if _instance_key(row) not in held_out
        )
        train = list(islice(rows, self.num_train))
        return self._with_prompts(train), self._with_prompts(val)

    def _with_prompts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each Countdown row with its ``prompt`` in ``template``."""
        return [{**row, "prompt": format_prompt(row, self.template)} for row in rows]

    def _file_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows of ``path`` (and ``val_path``), or ``path`` split with its last ``num_val`` rows held out."""
        assert self.path is not None  # checked in __init__
        rows = self._load(self.path, "data.path")
        if self.val_path is not None:
            return rows, self._load(self.val_path, "data.val_path")
        if len(rows) <= self.num_val:
            raise ValueError(
                f"data.num_val: holding out {self.num_val} of the {len(rows)} rows of '{self.path}' leaves no "
                "training rows; lower data.num_val or set data.val_path"
            )
        cut = len(rows) - self.num_val
        return rows[:cut], rows[cut:]

    def _load(self, path: str, setting: str) -> list[dict[str, Any]]:
        """Non-empty rows of a prompt file, each with its prompt (text or chat messages) under ``prompt``."""
        rows = load_prompt_file(path, prompt_key=self.prompt_key, setting=setting)
        if not rows:
            raise ValueError(f"{setting}: '{path}' has no rows")
        for number, row in enumerate(rows, start=1):
            prompt = row[self.prompt_key]
            error = prompt_error(prompt)
            if error is not None:
                raise ValueError(f"{setting}: '{path}' row {number}: {self.prompt_key!r} {error}")
            row["prompt"] = prompt
        return rows


def _instance_key(row: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """A Countdown instance up to the order of its numbers."""
    return tuple(sorted(row["numbers"])), row["target"]


def _validate(args: dict[str, Any]) -> None:
    """One-line ValueErrors, naming ``data.<arg>``, for settings that can be checked up front."""
    if args["source"] not in ("countdown", "file"):
        raise ValueError(f"data.source: expected 'countdown' or 'file', got {args['source']!r}")
    if args["source"] == "file" and not args["path"]:
        raise ValueError("data.path: required when data.source=file")
    if args["template"] not in TEMPLATES:
        raise ValueError(f"data.template: expected one of {', '.join(TEMPLATES)}, got {args['template']!r}")
    for name in ("batch_size", "val_batch_size"):
        if args[name] < 1:
            raise ValueError(f"data.{name}: must be >= 1, got {args[name]}")
    if args["num_val"] < 0:
        raise ValueError(f"data.num_val: must be >= 0, got {args['num_val']}")
    if args["source"] == "countdown":
        if args["num_train"] < 1:
            raise ValueError(f"data.num_train: must be >= 1, got {args['num_train']}")
        check_settings(
            args["min_numbers"], args["max_numbers"], args["max_number"], max_target=args["max_target"]
        )


def _distinct(rows: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of ``rows`` with distinct instances (numbers, target)."""
    out: list[dict[str, Any]] = []
    seen: set = set()
    for row in islice(rows, _VAL_DRAWS_PER_ROW * (n + 1)):
        if len(out) == n:
            break
        if _instance_key(row) not in seen:
            seen.add(_instance_key(row))
            out.append(row)
    if len(out) < n:
        raise ValueError(
            f"data.num_val: found only {len(out)} distinct Countdown instances; raise data.max_number"
        )
    return out
