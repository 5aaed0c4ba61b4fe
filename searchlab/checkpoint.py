"""A running trial's checkpoint: what it needs to go on from its last finished epoch.

A trial run by the Optuna engine keeps, in a folder of its own (``runner``: under the
project's working folder, ``<SEARCHLAB_HOME>/checkpoints/<MLflow run id>``, recorded on the
Optuna trial as user attr ``searchlab.checkpoint``), one file that is replaced after every
epoch it finishes:

- ``checkpoint.npz``: the epoch count, the phase, the batch size, the per-epoch history, the
  best value and epoch so far, the trained model's variables (Keras's ``model.variables``:
  weights, and the state of its ``SeedGenerator``s, so dropout goes on drawing the same
  numbers) and its optimizer's (its slots and step count, so a learning-rate schedule goes on
  where it was) -- for a trial trained on cached features, only the layers after the frozen
  prefix;
- ``best-<epoch>.npz``: the best epoch's weights, written only when an epoch improves on the
  best (named by the checkpoint; the one before is removed after the checkpoint is replaced).

Each file is written whole or not at all: to a temporary name in the same folder, flushed to
disk (``fsync``), then renamed over the old one (``os.replace``, atomic on POSIX), so a kill
at any moment leaves the previous epoch's checkpoint or this one, never half of one.  The
arrays are NumPy's ``.npz`` read without pickle; the variables go through Keras's public API
(``Variable.numpy``/``assign``), so the format is the same on every Keras backend.

The folder is on the local disk of the machine that runs the trial: another machine resumes
the trial only where that path is shared (NFS, a cluster's home); elsewhere the trial is
failed as stale and its point asked again, as before checkpoints.  ``load`` raises
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
FILE = "checkpoint.npz"
#: bumped when the layout changes: an older checkpoint is then unreadable, not misread
VERSION = 1


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


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save(folder: Path, state: State, *, best_changed: bool) -> None:
    """Replace ``folder``'s checkpoint with ``state`` (``best_changed``: write the best
    weights too; else the checkpoint keeps naming the last best file written)."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = _meta(folder / FILE) if exists(folder) else None
    best_file = previous.get("best_file") if previous else None
    if best_changed and state.best_weights is not None:
        new = f"best-{state.epoch}.npz"
        _write(folder / new, {f"w{i}": w for i, w in enumerate(state.best_weights)})
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
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"v{i}": v for i, v in enumerate(state.variables)})
    arrays.update({f"o{i}": v for i, v in enumerate(state.optimizer)})
    _write(folder / FILE, arrays)
    for stale in folder.glob("best-*.npz"):  # those no checkpoint names any more
        if stale.name != best_file:
            stale.unlink(missing_ok=True)


def _meta(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        return dict(json.loads(str(data["meta"])))


def load(folder: Path) -> State | None:
    """The checkpoint in ``folder``; None when there is none.  Raises ``CheckpointError``
    when it cannot be read."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("version") != VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format {meta.get('version')}, this searchlab "
                    f"reads {VERSION}"
                )
            variables = [data[f"v{i}"] for i in range(int(meta["n_variables"]))]
            optimizer = [data[f"o{i}"] for i in range(int(meta["n_optimizer"]))]
        best_weights = None
        if meta.get("best_file"):
            with np.load(Path(folder) / meta["best_file"], allow_pickle=False) as data:
                best_weights = [data[f"w{i}"] for i in range(len(data.files))]
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, not a zip, a missing key or best file
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
    for var, value in zip(variables, values, strict=True):
        var.assign(value)


def remove(folder: Path | None) -> None:
    """Delete ``folder`` and its checkpoint (the trial ended); nothing if it is gone."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["FILE", "CheckpointError", "State", "exists", "load", "remove", "restore", "save"]
