"""Checkpoint files: atomic writes, safe loads, and the run directory's list of them.

A checkpoint is a dict of tensors, primitives, lists and dicts (no pickled objects), so it loads
with ``torch.load(weights_only=True)``: loading a checkpoint cannot run code. It is written to a
temporary file in the same directory, flushed to disk (fsync), then renamed over its final name
(``os.replace``, atomic on POSIX): a run killed at any moment leaves every ``step-*.pt`` either
absent or complete, and the previous checkpoints untouched.

Layout: ``<run_dir>/checkpoints/step-00001000.pt``; temporaries start with a dot and end in ``.tmp``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

FORMAT = "aelearn-checkpoint"
VERSION = 1
_NAME = re.compile(r"step-(\d+)\.pt")


class CheckpointError(ValueError):
    """A file that is not a complete aelearn checkpoint."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically; ``path`` is either untouched or complete afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save({"format": FORMAT, "version": VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """The state saved at ``path``, loaded with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is truncated, corrupted, holds objects
    a weights-only load refuses, or is not an aelearn checkpoint; FileNotFoundError when absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, corrupted or not a weights-only file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); delete it to resume from the previous checkpoint"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aelearn checkpoint (no format marker {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}; this aelearn reads version {VERSION}")
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's complete checkpoints, by step (temporaries are not listed)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), entry) for entry in directory.iterdir() if (match := _NAME.fullmatch(entry.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (0: keep them all)."""
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            path.unlink(missing_ok=True)


def remove_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete what interrupted writes left behind."""
    directory = checkpoint_dir(run_dir)
    if directory.is_dir():
        for entry in directory.glob(".*.tmp"):
            entry.unlink(missing_ok=True)
