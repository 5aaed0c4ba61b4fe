"""A running trial's checkpoint: what it needs to go on from its last finished epoch.

A trial run by the Optuna engine keeps, in a folder of its own (``runner``: under the
project's working folder, ``<SEARCHLAB_HOME>/checkpoints/<MLflow run id>``, recorded on the
Optuna trial as user attr ``searchlab.checkpoint``), one file that is replaced after every
epoch it finishes:

- ``checkpoint.bin``: the epoch count, the phase, the batch size, the per-epoch history, the
  best value and epoch so far, the trained model's variables (Keras's ``model.variables``:
  weights, and the state of its ``SeedGenerator``s, so dropout goes on drawing the same
  numbers) and its optimizer's (its slots and step count, so a learning-rate schedule goes on
  where it was) -- for a trial trained on cached features, only the layers after the frozen
  prefix;
- ``best-<epoch>.bin``: the best epoch's weights, written only when an epoch improves on the
  best (named by the checkpoint; the one before is removed after the checkpoint is replaced).

Each file is written whole or not at all: to a temporary name in the same folder, flushed to
disk (``fsync``), then renamed over the old one (``os.replace``, atomic on POSIX), so a kill
at any moment leaves the previous epoch's checkpoint or this one, never half of one.  A file
is a JSON header (dtypes, shapes, the rest of the state) and the arrays' raw bytes, read
without pickle (``_write``); the variables go through Keras's public API
(``Variable.numpy``/``assign``), so the format is the same on every Keras backend.

The folder is on the local disk of the machine that runs the trial, and only a process of
that machine resumes it (``coordination``: the owner's host and pid say its process is
gone); a trial whose worker ran on another machine is failed once its heartbeat goes stale
and its point asked again, as before checkpoints -- also where the folder is on a shared
file system.  The trial writes the file in a thread (``training.Checkpointer``).  ``load`` raises
``CheckpointError`` for a file it cannot read or that does not match the model: the trial is
then failed with that error, and the study goes on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchlab.errors import SearchlabError

#: the file replaced after every epoch
FILE = "checkpoint.bin"
#: bumped when the layout changes: an older checkpoint is then unreadable, not misread
VERSION = 2
#: the first bytes of every file this module writes
MAGIC = b"SLCKPT02"


class CheckpointError(SearchlabError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the trial's model."""


@dataclass
class State:
    """What a trial needs to go on after ``epoch`` finished epochs (counted across phases)."""

    epoch: int
    phase: int
    batch_size: int
    history: dict[str, list[float]]
    best: float | None
    best_epoch: int | None
    variables: list[np.ndarray]
    optimizer: list[np.ndarray]
    #: the best epoch's weights (``target.get_weights()``), None before any finite objective
    best_weights: list[np.ndarray] | None = None
    #: tags the trial carries on (``searchlab.oom_retry``)
    tags: dict[str, str] = field(default_factory=dict)
    #: shapes of ``variables``, checked against the model on restore
    shapes: list[list[int]] = field(default_factory=list)


def exists(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / FILE).is_file()


def _write(path: Path, meta: dict[str, Any], arrays: list[np.ndarray]) -> None:
    """Write ``meta`` and ``arrays`` to ``path`` whole or not at all (temporary file, fsync,
    rename).  The layout: ``MAGIC``, the JSON header's length (8 bytes, little-endian), the
    header (``meta`` plus each array's dtype and shape), then the arrays' raw bytes.  Raw,
    not ``np.savez``: a zip's CRC over a VGG block's 100 MB took most of a checkpoint's time."""
    arrays = [a if a.flags.c_contiguous else a.copy(order="C") for a in arrays]
    header = dict(meta, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    head = json.dumps(header).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(MAGIC + len(head).to_bytes(8, "little") + head)
        for a in arrays:
            handle.write(a.reshape(-1).data.cast("B") if a.size else b"")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """What ``_write`` wrote; ``ValueError`` for anything else (a truncated file too)."""
    data = path.read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a searchlab checkpoint (or another format version)")
    start = len(MAGIC) + 8
    size = int.from_bytes(data[len(MAGIC) : start], "little")
    header = json.loads(data[start : start + size])
    offset, arrays = start + size, []
    for dtype, shape in header.pop("arrays"):
        count = int(np.prod(shape, dtype=np.int64))
        length = count * np.dtype(dtype).itemsize
        if offset + length > len(data):
            raise ValueError("truncated")
        arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape).copy())
        offset += length
    if offset != len(data):
        raise ValueError("trailing bytes")
    return header, arrays


def save(folder: Path, state: State, *, best_changed: bool) -> None:
    """Replace ``folder``'s checkpoint with ``state`` (``best_changed``: write the best
    weights too; else the checkpoint keeps naming the last best file written)."""
    folder.mkdir(parents=True, exist_ok=True)
    best_file = _best_file(folder)
    if best_changed and state.best_weights is not None:
        new = f"best-{state.epoch}.bin"
        _write(folder / new, {"version": VERSION}, list(state.best_weights))
        best_file = new
    meta = {
        "version": VERSION,
        "epoch": state.epoch,
        "phase": state.phase,
        "batch_size": state.batch_size,
        "history": state.history,
        "best": state.best,
        "best_epoch": state.best_epoch,
        "best_file": best_file,
        "tags": state.tags,
        "shapes": [list(v.shape) for v in state.variables],
        "n_variables": len(state.variables),
        "n_optimizer": len(state.optimizer),
    }
    _write(folder / FILE, meta, [*state.variables, *state.optimizer])
    for stale in folder.glob("best-*.bin"):  # those no checkpoint names any more
        if stale.name != best_file:
            stale.unlink(missing_ok=True)


def _best_file(folder: Path) -> str | None:
    """The best-weights file the checkpoint in ``folder`` names (the one it keeps)."""
    if not exists(folder):
        return None
    with open(folder / FILE, "rb") as handle:
        head = handle.read(len(MAGIC) + 8)
        if head[: len(MAGIC)] != MAGIC:
            return None
        meta = json.loads(handle.read(int.from_bytes(head[len(MAGIC) :], "little")))
    return meta.get("best_file")


def load(folder: Path) -> State | None:
    """The checkpoint in ``folder``; None when there is none.  Raises ``CheckpointError``
    when it cannot be read."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        meta, arrays = _read(path)
        if meta.get("version") != VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format {meta.get('version')}, this searchlab "
                f"reads {VERSION}"
            )
        n = int(meta["n_variables"])
        variables, optimizer = arrays[:n], arrays[n:]
        if len(optimizer) != int(meta["n_optimizer"]):
            raise ValueError("the optimizer's variables are missing")
        best_weights = None
        if meta.get("best_file"):
            _, best_weights = _read(Path(folder) / meta["best_file"])
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, another format, a missing key or best file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})"
        ) from None
    return State(
        epoch=int(meta["epoch"]),
        phase=int(meta["phase"]),
        batch_size=int(meta["batch_size"]),
        history={k: [float(x) for x in v] for k, v in meta["history"].items()},
        best=meta["best"],
        best_epoch=meta["best_epoch"],
        variables=variables,
        optimizer=optimizer,
        best_weights=best_weights,
        tags=dict(meta.get("tags") or {}),
        shapes=meta["shapes"],
    )


def read(variables: list[Any]) -> list[np.ndarray]:
    """The values of Keras variables as NumPy arrays (a copy)."""
    return [np.array(v.numpy(), copy=True) for v in variables]


def restore(variables: list[Any], values: list[np.ndarray], what: str) -> None:
    """Assign ``values`` to Keras ``variables``; ``CheckpointError`` when they do not match
    (another model, another Keras)."""
    check(variables, values, what)
    for var, value in zip(variables, values, strict=True):
        var.assign(value)


def check(variables: list[Any], values: list[np.ndarray], what: str) -> None:
    """``CheckpointError`` unless ``values`` are one per variable, of its shape."""
    if len(variables) != len(values):
        raise CheckpointError(
            f"the checkpoint holds {len(values)} {what} variables, the model has {len(variables)}"
        )
    for var, value in zip(variables, values, strict=True):
        if tuple(var.shape) != tuple(value.shape):
            raise CheckpointError(
                f"the checkpoint's {what} variable {var.path} has shape {value.shape}, the "
                f"model's {tuple(var.shape)}"
            )


def remove(folder: Path | None) -> None:
    """Delete ``folder`` and its checkpoint (the trial ended); nothing if it is gone."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "FILE",
    "CheckpointError",
    "State",
    "check",
    "exists",
    "load",
    "remove",
    "restore",
    "save",
]
