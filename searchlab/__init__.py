"""searchlab: hyperparameter search for Keras, driven by Optuna, tracked in MLflow.

Users write study files with the public names below::

    from searchlab import Study, Int, Float, Choice, Bool, Dataset

run one from a notebook with ``searchlab.run(study_or_path, trials=..., epochs=...)`` (in this
process, with a progress bar; it returns the best trial and ``table()``), and read results
back with ``searchlab.results(path)`` (a pandas DataFrame) and ``searchlab.best(path)``.
KerasTuner scripts run on searchlab with one import changed: ``import searchlab.keras_tuner
as kt``.  A study file's own knobs read from the environment go
through ``searchlab.setting(NAME, default=...)``, so errors name the variable to change.
"""

# ruff: noqa: E402 - the command's guard against Ctrl-C comes before every other import
from searchlab import interrupts as _interrupts

_interrupts.guard_start()  # the command's Ctrl-C while it imports: exit 130, no traceback

from searchlab import backend as _backend  # noqa: F401 - first: TF GPU memory growth
from searchlab.api import run
from searchlab.config import setting
from searchlab.data import Dataset
from searchlab.errors import (
    DataError,
    SearchlabError,
    SpaceError,
    StoreError,
    StudyDefinitionError,
    TrialFailed,
)
from searchlab.report import best, results
from searchlab.space import Bool, Choice, Float, Int, Space
from searchlab.study import Study, load_study

__version__ = "0.1.0"

__all__ = [
    "Bool",
    "Choice",
    "DataError",
    "Dataset",
    "Float",
    "Int",
    "SearchlabError",
    "Space",
    "SpaceError",
    "StoreError",
    "Study",
    "StudyDefinitionError",
    "TrialFailed",
    "best",
    "load_study",
    "results",
    "run",
    "setting",
]
