"""Where searchlab keeps things by default: one project-local folder, ``.searchlab/``, and
where it finds datasets and backbone weights: the data directory (``find_data_dir``).

``SEARCHLAB_HOME`` moves the folder.  Inside it: ``optuna.db`` (Optuna storage, SQLite),
``mlflow.db`` (MLflow tracking store, SQLite) and ``mlartifacts/`` (MLflow artifacts).

``SEARCHLAB_STORAGE`` and ``MLFLOW_TRACKING_URI`` name other stores.  The CLI reads them
through click (``envvar=`` on ``--storage`` and ``--tracking-uri``, so ``--help`` shows
them); the ``default_*`` functions here read them too, for library callers that pass no URL.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
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


# ------------------------------------------------------------------------ the data directory

DATA_DIR_ENV = "SEARCHLAB_DATA_DIR"
#: project files that may name the data directory, looked for in this order in each folder
PROJECT_FILES = ("searchlab.toml", "pyproject.toml")


@dataclass(frozen=True)
class DataDirSetting:
    """The data directory in force and where that came from: ``path`` is None when nothing
    names one (Keras's cache is used); ``source`` says who named it, in the user's words
    (``--data-dir``, ``$SEARCHLAB_DATA_DIR``, ``pyproject.toml [tool.searchlab] at /p``)."""

    path: Path | None
    source: str
    #: a project file that cannot be read, or a folder named that does not exist: one line
    problem: str | None = None

    def describe(self) -> str:
        return f"{self.path} (from {self.source})" if self.path else self.source


def find_data_dir(
    explicit: str | os.PathLike[str] | None = None,
    *,
    explicit_source: str = "--data-dir",
    start: Path | None = None,
) -> DataDirSetting:
    """The one rule every entry point (CLI, scripts, notebooks) finds the data directory by,
    first match wins:

    1. ``explicit`` (the ``--data-dir`` flag, or a library caller's argument);
    2. ``$SEARCHLAB_DATA_DIR``;
    3. a project setting, in the nearest folder from ``start`` (the working directory) up
       to the filesystem root holding ``searchlab.toml`` with a top-level
       ``data_dir = "..."`` or ``pyproject.toml`` with ``[tool.searchlab] data_dir = "..."``;
       a relative path is relative to that file's folder;
    4. none (``path`` None): Keras's cache (``~/.keras/datasets``), then its downloads.

    Example ``pyproject.toml``::

        [tool.searchlab]
        data_dir = "../shared/data"

    ``problem`` is set (one line naming the setting and the fix) for a project file that
    is not valid TOML or whose ``data_dir`` is not a string, and for a folder named that does
    not exist (``data.data_dir`` raises it as a ``DataError``).
    """
    found = _find_data_dir(explicit, explicit_source, start)
    if found.problem is None and found.path is not None and not found.path.is_dir():
        problem = (
            f"The data directory {found.path} (from {found.source}) does not exist: create it "
            "and put the datasets there, or change that setting."
        )
        return DataDirSetting(found.path, found.source, problem)
    return found


def _find_data_dir(
    explicit: str | os.PathLike[str] | None, explicit_source: str, start: Path | None
) -> DataDirSetting:
    if explicit:
        return DataDirSetting(Path(explicit).expanduser().resolve(), explicit_source)
    value = os.environ.get(DATA_DIR_ENV)
    if value:
        return DataDirSetting(Path(value).expanduser().resolve(), f"${DATA_DIR_ENV}")
    folder = (start or Path.cwd()).resolve()
    for place in (folder, *folder.parents):
        for name in PROJECT_FILES:
            found = _project_setting(place / name)
            if found is not None:
                return found
    return DataDirSetting(None, f"none set (--data-dir, ${DATA_DIR_ENV} or [tool.searchlab])")


def _project_setting(path: Path) -> DataDirSetting | None:
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problem = (
            f"{path} cannot be read for its data_dir setting ({exc}): fix the file, or name "
            f"the data directory with --data-dir or ${DATA_DIR_ENV}."
        )
        return DataDirSetting(None, f"{path.name} at {path}", problem)
    table = doc if path.name == "searchlab.toml" else doc.get("tool", {}).get("searchlab", {})
    where = "" if path.name == "searchlab.toml" else " [tool.searchlab]"
    if not isinstance(table, dict) or "data_dir" not in table:
        return None
    value = table["data_dir"]
    if not isinstance(value, str) or not value:
        problem = f"data_dir in {path}{where} must be a folder path (a string), got {value!r}."
        return DataDirSetting(None, f"{path.name}{where} at {path}", problem)
    resolved = (path.parent / Path(value).expanduser()).resolve()
    return DataDirSetting(resolved, f"{path.name}{where} at {path}")


# ------------------------------------------------------- settings a study file reads from the environment


@dataclass(frozen=True)
class EnvSetting:
    """One ``searchlab.setting(name, default)`` a study file read: its value, and whether the
    environment variable gave it (else the default did)."""

    name: str
    value: str
    default: str
    from_env: bool
    #: the study file being loaded when it was read (as the user named it), or None
    study_file: str | None


_READ: dict[str, EnvSetting] = {}
_LOADING: list[str] = []  # the study file ``load_study`` is executing (at most one)


def setting(name: str, default: str) -> str:
    """The value of environment variable ``name``, else ``default``, for a study file's knobs;
    searchlab remembers which variable gave which value, so an error about that value (a
    missing weights file, say) and ``searchlab doctor`` name the variable to change, not a
    parameter the user never wrote.

    Example::

        import searchlab
        weights = searchlab.setting("CIFAR_VGG_WEIGHTS", default="imagenet")
        vgg16 = Transfer("vgg16", weights=None if weights == "none" else weights)

    Args:
        name: the environment variable.
        default: the value when the variable is unset or empty.
    """
    given = os.environ.get(name)
    from_env = bool(given)
    value = given if given else default
    _READ[name] = EnvSetting(name, value, default, from_env, _LOADING[-1] if _LOADING else None)
    return value


def settings_read(value: str | None = None) -> list[EnvSetting]:
    """The settings study files read in this process (last read first); with ``value``,
    only those that gave that value (compared case-insensitively, as study files do)."""
    found = list(reversed(_READ.values()))
    if value is None:
        return found
    return [s for s in found if s.value.lower() == str(value).lower()]


def setting_for(value: str | None) -> EnvSetting | None:
    """The ``setting`` that gave ``value`` (None stands for ``"none"``) in the study file
    loading now (or, outside one, in none): what a builder made of that value records, so
    its errors name the variable.  The latest such read, compared case-insensitively."""
    wanted = "none" if value is None else str(value)
    loading = _LOADING[-1] if _LOADING else None
    for read in settings_read(wanted):
        if read.study_file == loading:
            return read
    return None


class loading_study:  # noqa: N801 - used as ``with config.loading_study(path):``
    """While a study file executes: the settings it reads are recorded as its own."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        _LOADING.append(self.path)

    def __exit__(self, *exc: object) -> None:
        _LOADING.pop()
