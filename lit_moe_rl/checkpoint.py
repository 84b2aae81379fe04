"""Crash-safe checkpoints: ``last.ckpt`` at every run's end, written to a temporary file and renamed.

:class:`LastCheckpoint` is the ``ModelCheckpoint`` the CLI registers. Over Lightning's own it:

- writes every checkpoint to ``.<name>.tmp`` beside the target and renames it into place (``os.replace``,
  atomic on POSIX), so a ``kill -9`` during a write leaves the previous checkpoint whole;
- saves ``last.ckpt`` when training ends at a step not yet saved (Lightning's ``save_last`` only saves
  at the end when no checkpoint was written during the run, so a run of 73 steps saving every 50 would
  leave step 50 as "last");
- lets ``--ckpt_path last`` find the newest ``last.ckpt`` of any earlier version of the same logger
  (a resumed run logs to a new ``version_N`` folder, where Lightning alone would look).

A sharded (``ModelParallelStrategy`` with ``save_distributed_checkpoint: true``) checkpoint is a folder: it
is written beside the target, flushed to disk (every file and the folder ``fsync``-ed), and swapped in by
two renames: ``last.ckpt -> .last.ckpt.old``, then ``.last.ckpt.tmp -> last.ckpt`` (the old one removed
last, the parent folder ``fsync``-ed after each step). A crash between the two renames leaves no
``last.ckpt`` but a complete ``.last.ckpt.tmp`` (it was flushed before the first rename, so
``.last.ckpt.old`` existing proves it whole): :func:`recover` puts it back before ``--ckpt_path last`` is
resolved, so a resume never falls back silently to an older run's ``last.ckpt``.

A write that fails (a full disk) removes its partial ``.<name>.tmp`` and stops the run with one line
(:class:`CheckpointError`); the previous checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic writes and a ``last.ckpt`` at the end of every run."""

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = 50,
        save_last: bool = True,
        save_top_k: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            dirpath: Folder of the checkpoints (default: ``<log_dir>/checkpoints``).
            every_n_train_steps: Save every N optimizer steps (and at the end of the run).
            save_last: Keep ``last.ckpt`` pointing at the newest state.
            save_top_k: Keep this many step checkpoints besides ``last.ckpt`` (0: only ``last.ckpt``).
            kwargs: Further ``ModelCheckpoint`` arguments.
        """
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )
        self._validated_since_save = False

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        tmp = target.with_name(f".{target.name}.tmp")
        if trainer.is_global_zero:
            recover(target)  # an earlier crash between the two renames of a folder swap
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank writes its part, then a barrier
        except OSError as err:  # a full disk, a quota, a read-only folder
            _remove(tmp)
            raise CheckpointError(
                f"{target}: writing the checkpoint at step {trainer.global_step} failed ({err.strerror or err}); "
                f"the partial {tmp.name} was removed and the previous {target.name} is unchanged: free space "
                f"in {target.parent} or point the checkpoint callback's dirpath elsewhere"
            ) from None
        if trainer.is_global_zero:
            replace(tmp, target)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._validated_since_save = False
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and self._last_global_step_saved == trainer.global_step:
            self._validated_since_save = True  # the step's save came first: it lacks this validation

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_last_now(trainer)

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Save ``last.ckpt`` at the current step unless it was saved there already, after the step's
        validation (a step's save runs before its validation: resaved, the run summary's history and
        the loops' state in ``last.ckpt`` include it)."""
        stale = self._validated_since_save
        if self.save_last and (self._last_global_step_saved != trainer.global_step or stale):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        logger = trainer.logger
        folders = [self.dirpath] if self.dirpath is not None else []
        if self.dirpath is None and logger is not None and logger.save_dir is not None:
            folders += glob.glob(os.path.join(logger.save_dir, str(logger.name or ""), "*", "checkpoints"))
        for folder in folders:  # before looking: a swap cut short must not hide the newest checkpoint
            recover_folder(Path(folder))  # on every rank (no process group yet): the renames tolerate races
        found = super()._find_last_checkpoints(trainer)
        for folder in folders[0 if self.dirpath is None else 1 :]:
            found |= set(glob.glob(os.path.join(folder, "last*.ckpt")))
        return found


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (one line: the file, the step, the cause)."""


def save_last_now(trainer: L.Trainer) -> None:
    """Every :class:`LastCheckpoint` saves ``last.ckpt`` at the current step (a collective)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, LastCheckpoint):
            callback.save_last_now(trainer)


def interrupted_lines(trainer: L.Trainer, what: str, command: list[str] | None) -> list[str]:
    """Which step the run stopped at, which step its ``last.ckpt`` holds, and the command that resumes it."""
    saved = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
    head = f"{what}: stopped after optimizer step {trainer.global_step}"
    if not saved:
        return [f"{head}; this run wrote no checkpoint (nothing to resume from)"]
    callback = saved[-1]
    path = callback.last_model_path
    step = callback._last_global_step_saved
    held = f"step {step}" if step else f"the step it was resumed from ({trainer.ckpt_path})"
    return [f"{head}; {path} holds {held}", f"resume: {resume_command(command, path)}"]


def resume_command(command: list[str] | None, ckpt_path: str) -> str:
    """``command`` (the run's command line) with ``--ckpt_path`` set to ``ckpt_path``."""
    if not command:
        return f"lit-moe-rl fit <this run's arguments> --ckpt_path {shlex.quote(str(ckpt_path))}"
    kept: list[str] = []
    skip = False
    for arg in command:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        kept.append(arg)
    return shlex.join([*kept, "--ckpt_path", str(ckpt_path)])


def replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``: one atomic rename for a file, two renames for a folder; each
    written file and each changed folder is ``fsync``-ed, so a power loss cannot reorder the steps."""
    _fsync_tree(tmp)
    if tmp.is_dir() and target.exists():
        old = _old(target)
        _remove(old)
        os.replace(target, old)
        _fsync(target.parent)
        os.replace(tmp, target)
        _fsync(target.parent)
        _remove(old)
    else:
        os.replace(tmp, target)
    _fsync(target.parent)


def recover(target: Path) -> None:
    """Finish a folder swap of ``target`` that a crash cut short (see the module docstring).

    ``.old`` exists only once the ``.tmp`` folder was complete and flushed: with no ``target``, the
    ``.tmp`` (else the ``.old``) becomes ``target``; with ``target`` in place the ``.old`` is removed.
    Without ``.old`` a ``.tmp`` may be a torn write and is left alone (the next save replaces it)."""
    old, tmp = _old(target), target.with_name(f".{target.name}.tmp")
    if not old.exists():
        return
    if not target.exists():
        with contextlib.suppress(FileNotFoundError):  # another rank recovered it first
            os.replace(tmp if tmp.exists() else old, target)
    _remove(old)
    _fsync(target.parent)


def recover_folder(folder: Path) -> None:
    """:func:`recover` every checkpoint of ``folder`` whose swap was cut short."""
    for old in folder.glob(".*.old"):
        recover(old.with_name(old.name[1 : -len(".old")]))


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))
    elif path.exists():
        _fsync(path)
