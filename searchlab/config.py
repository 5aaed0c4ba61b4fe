"""Where searchlab keeps things by default: one project-local folder, ``.searchlab/``.

``SEARCHLAB_HOME`` moves the folder.  Inside it: ``optuna.db`` (Optuna storage, SQLite),
``mlflow.db`` (MLflow tracking store, SQLite) and ``mlartifacts/`` (MLflow artifacts).

``SEARCHLAB_STORAGE`` and ``MLFLOW_TRACKING_URI`` name other stores.  The CLI reads them
through click (``envvar=`` on ``--storage`` and ``--tracking-uri``, so ``--help`` shows
them); the ``default_*`` functions here read them too, for library callers that pass no URL.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SEARCHLAB_HOME"
STORAGE_ENV = "SEARCHLAB_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or ".searchlab").expanduser().resolve()


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{home() / 'optuna.db'}"


def default_tracking_uri() -> str:
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return home() / "mlartifacts"
