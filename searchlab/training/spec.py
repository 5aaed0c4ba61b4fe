"""What a trial is handed and what it leaves: ``TrialSpec``, the weight-file names, the
batch size and seed a trial derives from them.  Imports no Keras (nor TensorFlow, MLflow)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchlab import backend
from searchlab.data import Data

EpochCallback = Callable[[int, dict[str, float]], None]
#: a trial's best weights: the complete model's (``full``) ...
WEIGHTS_FILE = "best.weights.h5"
#: ... or, for a trial trained entirely on cached features, only the layers after the frozen
#: prefix plus the prefix's fingerprint (``suffix``; see ``cache.save_suffix``)
SUFFIX_WEIGHTS_FILE = "best.suffix.npz"
WEIGHTS_FILES = (WEIGHTS_FILE, SUFFIX_WEIGHTS_FILE)


@dataclass(frozen=True)
class TrialSpec:
    """Everything about a trial that does not change from one trial to the next."""

    build: Callable[..., Any]
    data: Data
    epochs: int
    objective: str = "val_accuracy"
    direction: str = "maximize"
    batch_size: int = 32
    seed: int = 0
    precision: str = backend.DEFAULT_PRECISION  # a Keras dtype policy, see backend.PRECISIONS
    #: a HyperModel's own fit: ``fit(params, model, x, y, **kwargs)`` (``hp.HpSpace.fit_trial``)
    fit: Callable[..., Any] | None = None
    #: fresh models fit per trial (KerasTuner's ``executions_per_trial``)
    executions: int = 1
    #: a model with more parameters fails its trial before training (KerasTuner's option)
    max_model_size: int | None = None
    #: the folder of this trial's checkpoint (``searchlab.checkpoint``): written after each
    #: epoch, and read first -- a trial that finds one goes on from it; None: no checkpoint
    checkpoint: Path | None = None
    #: False: no trial trains on cached features (the study's ``cache=False``)
    cache: bool = True
    #: seeds the building of a study's own model in every trial (its backbone's random
    #: initialisation, then the same in each trial); the trial's seed drives its fit
    backbone_seed: int | None = None

    def better(self, a: float, b: float | None) -> bool:
        if b is None:
            return True
        return a > b if self.direction == "maximize" else a < b


def batch_size_of(params: Mapping[str, Any], spec: TrialSpec) -> int:
    """The batch size a trial trains with: its ``batch_size`` param, else the study's."""
    return int(params.get("batch_size", spec.batch_size))


def with_batch_size(
    params: Mapping[str, Any], spec: TrialSpec, size: int
) -> tuple[Mapping[str, Any], TrialSpec]:
    if "batch_size" in params:
        params = {**params, "batch_size": size}
    return params, dataclasses.replace(spec, batch_size=size)


def weights_file(path: Path) -> Path:
    """A trial's weights file: ``path`` itself, or the one in folder ``path`` (a downloaded
    ``weights`` artifact folder holds either form)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHTS_FILES)} in {path}")
