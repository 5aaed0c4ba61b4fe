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
HEARTBEAT_ENV = "SEARCHLAB_HEARTBEAT_SECONDS"
#: set to 1 by ``searchlab run`` for its one worker when its own output is a terminal: the
#: worker's output is a pipe to the launcher, which passes its progress line through as is
TTY_ENV = "SEARCHLAB_TTY"
#: ``searchlab run --session KEY``: processes with the same key share one session (parent run)
SESSION_ENV = "SEARCHLAB_SESSION"
DEFAULT_HEARTBEAT = 10  # seconds between a running trial's heartbeats
GRACE_FACTOR = 6  # a trial is stale after GRACE_FACTOR heartbeats were missed


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or ".searchlab").expanduser().resolve()


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{home() / 'optuna.db'}"


def default_tracking_uri() -> str:
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{home() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return home() / "mlartifacts"


def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats (``$SEARCHLAB_HEARTBEAT_SECONDS``,
    default 10)."""
    value = os.environ.get(HEARTBEAT_ENV)
    try:
        seconds = int(value) if value else DEFAULT_HEARTBEAT
    except ValueError:
        seconds = DEFAULT_HEARTBEAT
    return max(1, seconds)


def grace_period(interval: int | None = None) -> int:
    """Seconds without a heartbeat after which a running trial is stale."""
    return (interval or heartbeat_interval()) * GRACE_FACTOR


#: decoded images (as float32) above this many MB are streamed from disk, not held in memory
DATA_MEMORY_ENV = "SEARCHLAB_DATA_MEMORY_MB"
DEFAULT_DATA_MEMORY_MB = 2048
DATA_CACHE_DIR = "data-cache"


def data_memory_mb() -> int:
    """The bound above which a study's decoded images stream from disk
    (``$SEARCHLAB_DATA_MEMORY_MB``, default 2048)."""
    value = os.environ.get(DATA_MEMORY_ENV)
    try:
        return max(0, int(value)) if value else DEFAULT_DATA_MEMORY_MB
    except ValueError:
        return DEFAULT_DATA_MEMORY_MB


def data_cache_dir() -> Path:
    """Where decoded images that stream from disk are kept (``<home>/data-cache``)."""
    return home() / DATA_CACHE_DIR
