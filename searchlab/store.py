"""The Optuna storage: where a study's search state lives, whichever engine ran it.

Both engines record every trial here (params, state, objective, per-epoch values, and the
trial's MLflow run id as user attr ``mlflow_run_id``), so the budget, resume, ``export``,
``report``, ``doctor`` and re-evaluation read one store.  This module opens storages, creates
or loads a study (refusing one whose space, objective or direction changed), and answers
the reads the rest of searchlab needs in searchlab's own terms (``StoredTrial``,
``TrialState``): nothing outside ``store``, ``engines.optuna``, ``coordination`` and
``report``'s plots touches an Optuna object.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState

from searchlab import config
from searchlab.errors import NotRunError, StoreError, StudyDefinitionError, hide_password
from searchlab.outcome import TrialState

log = logging.getLogger(__name__)
#: the trial's MLflow run id, a user attr of each Optuna trial
RUN_ID_ATTR = "mlflow_run_id"
#: epochs the trial trained, and its error (failed trials)
EPOCHS_ATTR = "epochs_run"
ERROR_ATTR = "error"
#: on a trial that was paused (Ctrl-C with a checkpoint) and went on later: the seconds it
#: trained, its processes together and the pauses left out (its ``duration_s``)
ACTIVE_ATTR = "searchlab.active_s"
#: the study's declared space and objective, to refuse a changed study file; under
#: ``SETTINGS_KEY`` in it, the settings that change results (``runner.result_settings``)
SPACE_ATTR = "searchlab.space"
SETTINGS_KEY = "_settings"

STATES = {
    OptunaState.COMPLETE: TrialState.COMPLETE,
    OptunaState.PRUNED: TrialState.PRUNED,
    OptunaState.FAIL: TrialState.FAILED,
    OptunaState.RUNNING: TrialState.RUNNING,
    OptunaState.WAITING: TrialState.WAITING,
}
OPTUNA_STATES = {v: k for k, v in STATES.items()}
FINISHED = (OptunaState.COMPLETE, OptunaState.PRUNED)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``: SQLAlchemy's own rendering for a
    database URL, the same ``user:***@host`` for an ``http(s)://`` tracking server."""
    import urllib.parse

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https"):
        if parsed.password is None:
            return url
        host = parsed.netloc.rsplit("@", 1)[1]
        user = urllib.parse.quote(parsed.username or "", safe="")
        return urllib.parse.urlunsplit(parsed._replace(netloc=f"{user}:***@{host}"))
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


#: database servers searchlab reaches through SQLAlchemy (``--storage``, ``--tracking-uri``)
DB_SERVERS = ("postgresql", "mysql", "mssql", "oracle")


def is_db_server(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in DB_SERVERS


def check_db_server(url: str, what: str, flag: str, timeout: int = 10) -> None:
    """Connect to the database server of ``url`` and disconnect, writing nothing: one
    ``StoreError`` within about ``timeout`` seconds when it cannot be reached, refuses the
    credentials or lacks the database (the password is never shown)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(
            url, connect_args={"connect_timeout": timeout}, poolclass=sqlalchemy.pool.NullPool
        )
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"Cannot open {what} {redact(url)}: its database driver {exc.name!r} is not "
            "installed. For PostgreSQL: pip install 'searchlab[postgres]'."
        ) from None
    except Exception as exc:
        text = str(getattr(exc, "orig", None) or exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise StoreError(
            f"Cannot open {what} {redact(url)}: {hide_password(first, url)}. Check {flag} (host, "
            "port, user, password, database)."
        ) from None


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for other storages."""
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL, or raise ``StoreError`` with one line that says why.

    Trials record heartbeats (``config.heartbeat_interval``; see ``coordination``).
    """
    interval = config.heartbeat_interval()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": 60}}
        elif url.startswith(("postgresql", "mysql")):
            kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks heartbeat_interval experimental
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=interval,
                grace_period=config.grace_period(interval),
            )
        if path is not None:
            # WAL lets worker processes read while one writes; it is a property of the file.
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return storage
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"Cannot open the Optuna storage {redact(url)}: its database driver "
            f"{exc.name!r} is not installed. For PostgreSQL: pip install 'searchlab[postgres]'."
        ) from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"Cannot open the Optuna storage {redact(url)}: {hide_password(first, url)}. "
            "Check --storage (for PostgreSQL: host, port, user, password, database)."
        ) from None


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    missing: list[Path] = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def describe_changes(changed: Mapping[str, tuple[str | None, str | None]]) -> str:
    """``epochs 2 -> 3, subset all -> train=300``: what changed, for one line."""
    return ", ".join(
        f"{k} {was or 'unset'} -> {now or 'unset'}" for k, (was, now) in changed.items()
    )


def study_names(url: str) -> list[str]:
    """The names of the studies a storage holds (``doctor``)."""
    return list(optuna.get_all_study_names(storage=open_storage(url)))


@dataclass(frozen=True)
class StoredTrial:
    """One trial as the storage holds it, in searchlab's terms."""

    number: int
    state: TrialState
    value: float | None
    params: dict[str, Any]
    run_id: str | None
    epochs: int | None
    duration_s: float | None
    error: str | None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The trial as a row of the trials table (``searchlab.table``)."""
        return {
            "number": self.number,
            "state": self.state.value,
            "value": self.value,
            "epochs": self.epochs,
            "duration_s": self.duration_s,
            "run_id": self.run_id,
            "params": dict(self.params),
        }


def stale_reason() -> str:
    """Why a trial failed without an ``error`` attr: only Optuna's own stale-trial check
    (``optuna.storages.fail_stale_trials``) fails a trial without giving one, and it cannot
    be given afterwards (a finished trial's attrs are frozen)."""
    return (
        f"interrupted: its worker sent no heartbeat for {config.grace_period()} s (killed or "
        "crashed); the trial will be run again"
    )


def _duration_s(t: optuna.trial.FrozenTrial) -> float | None:
    """How long a trial trained: Optuna's start-to-end time, but for a trial that was paused
    and went on later, its training time without the pause (``ACTIVE_ATTR``)."""
    if t.user_attrs.get(ACTIVE_ATTR) is not None:
        return float(t.user_attrs[ACTIVE_ATTR])
    return t.duration.total_seconds() if t.duration else None


def stored(t: optuna.trial.FrozenTrial) -> StoredTrial:
    state = STATES[t.state]
    error = t.user_attrs.get(ERROR_ATTR)
    if error is None and state is TrialState.FAILED:
        error = stale_reason()
    return StoredTrial(
        number=t.number,
        state=state,
        value=t.value if state is TrialState.COMPLETE else None,
        params=dict(t.params),
        run_id=t.user_attrs.get(RUN_ID_ATTR),
        epochs=t.user_attrs.get(EPOCHS_ATTR),
        duration_s=_duration_s(t),
        error=error,
        attrs=dict(t.user_attrs),
    )


class StudyStore:
    """One study in an Optuna storage: ``StudyStore.open`` for a run (creates the study),
    ``StudyStore.load`` for reading results (never creates anything)."""

    def __init__(self, ostudy: optuna.Study, storage: Any, url: str) -> None:
        self.ostudy = ostudy
        self.storage = storage
        self.url = url
        #: what ``open(..., allow_changed_settings=True)`` let change: name -> (was, now)
        self.changed_settings: dict[str, tuple[str | None, str | None]] = {}
        #: what ``open`` created: the study, the SQLite file, its folders (``discard``)
        self._created: tuple[bool, Path | None, list[Path]] = (False, None, [])

    @classmethod
    def open(
        cls,
        name: str,
        url: str,
        *,
        direction: str,
        described: Mapping[str, Any],
        sampler: optuna.samplers.BaseSampler,
        settings: Mapping[str, str] | None = None,
        allow_changed_settings: bool = False,
    ) -> StudyStore:
        """Create or load study ``name``; refuse a stored one whose ``described`` space and
        objective, or whose direction, differ from the study file's.

        ``settings`` (what changes a trial's results: epochs, data, ...) are kept with the
        space; a stored study whose settings differ is refused too, in one line naming what
        changed, unless ``allow_changed_settings``: then they are replaced and what changed
        is in ``changed_settings``.  A study stored before settings were kept takes these.
        """
        path = sqlite_path(url)
        new_file = path if path is not None and not path.exists() else None
        new_dirs = _missing_folders(path.parent) if path is not None else []
        storage = open_storage(url)
        new_study = name not in optuna.get_all_study_names(storage=storage)
        ostudy = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            direction=optuna.study.StudyDirection[direction.upper()],
            pruner=optuna.pruners.NopPruner(),  # not Optuna's default MedianPruner
            load_if_exists=True,
        )
        described = dict(described)
        kept = ostudy.user_attrs.get(SPACE_ATTR)
        new = {**described, **({SETTINGS_KEY: dict(settings)} if settings is not None else {})}
        changed: dict[str, tuple[str | None, str | None]] = {}
        if kept is None:
            ostudy.set_user_attr(SPACE_ATTR, new)
        else:
            stored_space = {k: v for k, v in kept.items() if k != SETTINGS_KEY}
            if stored_space != described:
                differs = sorted(
                    k
                    for k in set(stored_space) | set(described)
                    if stored_space.get(k) != described.get(k)
                )
                raise StudyDefinitionError(
                    f"The storage already holds a study named {name!r} with a different space "
                    f"or objective (differs in: {', '.join(differs)}). Give the study a new "
                    "name, or use another --storage."
                )
            was = kept.get(SETTINGS_KEY)
            if settings is not None and was is not None:
                changed = {
                    k: (was.get(k), settings.get(k))
                    for k in sorted(set(was) | set(settings))
                    if was.get(k) != settings.get(k)
                }
                if changed and not ostudy.get_trials(deepcopy=False):
                    # no trial of it ever started (a run that stopped before training):
                    # nothing was pinned, the new settings are its first
                    changed = {}
                    ostudy.set_user_attr(SPACE_ATTR, new)
                if changed and not allow_changed_settings:
                    raise StudyDefinitionError(
                        f"Study {name!r} was run with other settings ({describe_changes(changed)}): "
                        "its trials would not compare with new ones. Start a new study (another "
                        "name= in the study file, or another --storage), go back to its "
                        "settings, or pass --allow-changed-settings to continue it anyway."
                    )
            if settings is not None and (was is None or changed):
                ostudy.set_user_attr(SPACE_ATTR, new)
        if ostudy.direction.name.lower() != direction:
            raise StudyDefinitionError(
                f"The storage holds study {name!r} with direction "
                f"{ostudy.direction.name.lower()}, but the study file says {direction}. "
                "Give the study a new name."
            )
        objective = described.get("_objective")
        if isinstance(objective, str) and ostudy.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks set_metric_names experimental
                ostudy.set_metric_names([objective])  # Optuna Dashboard and plots name it
        store = cls(ostudy, storage, url)
        store.changed_settings = changed
        store._created = (new_study, new_file, new_dirs)
        return store

    def discard(self) -> None:
        """Undo what ``open`` created -- the study, and the SQLite file and folders when it
        created those -- for a session that stopped before it began (the MLflow store could
        not be opened): a failed run writes nothing."""
        new_study, new_file, new_dirs = self._created
        self._created = (False, None, [])
        if new_file is not None:
            self.storage.engine.dispose()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{new_file}{suffix}").unlink(missing_ok=True)
        elif new_study:
            optuna.delete_study(study_name=self.name, storage=self.storage)
        for folder in reversed(new_dirs):
            try:
                folder.rmdir()
            except OSError:  # not empty (another process uses it) or gone
                break

    @classmethod
    def load(cls, name: str, url: str) -> StudyStore:
        """The stored study ``name`` for reading results; never creates a store or a study.

        Raises ``StoreError`` when a local SQLite storage file does not exist, and
        ``NotRunError`` when the storage holds no study of that name.
        """
        path = sqlite_path(url)
        if path is not None and not path.is_file():
            raise StoreError(
                f"No Optuna storage at {path}: the study was never run here. "
                "Run it first (searchlab run STUDY_FILE), or pass the --storage it ran with."
            )
        storage = open_storage(url)
        try:
            ostudy = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise NotRunError(
                f"Study {name!r} was never run: {redact(url)} holds no study of that name. Run "
                "it first (searchlab run STUDY_FILE), or pass the --storage it ran with."
            ) from None
        return cls(ostudy, storage, url)

    # ---------------------------------------------------------------------------- writes

    def annotate(self, trial: Any, result: Any) -> None:
        """Record on a running trial how many epochs it trained and, if it failed, why; a
        trial that ran out of memory also gets Optuna's constraint ``out_of_memory`` = 1
        (infeasible), which constrained samplers learn from."""
        trial.set_user_attr(EPOCHS_ATTR, result.epochs_run)
        if result.error:
            trial.set_user_attr(ERROR_ATTR, result.error[:2000])
        if result.tags.get("searchlab.oom"):  # what a sampler's constraints read (Optuna 5)
            trial.set_constraint("out_of_memory", 1.0)

    def tell(self, trial: Any, state: TrialState, value: float | None = None) -> None:
        """End a running trial: complete with its ``value``, pruned or failed.  A trial that
        another process already failed as stale (its heartbeats did not reach the store) is
        left as it is: the next reconcile fails its MLflow run too, and it runs again."""
        try:
            if state is TrialState.COMPLETE:
                self.ostudy.tell(trial, value, skip_if_finished=True)
            else:
                self.ostudy.tell(trial, state=OPTUNA_STATES[state], skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %s was failed as stale by another worker", trial.number)

    def use(self, sampler: Any) -> None:
        """Sample the study's open params with ``sampler`` from now on."""
        self.ostudy.sampler = sampler

    # ----------------------------------------------------------------------------- reads

    @property
    def name(self) -> str:
        return self.ostudy.study_name

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``."""
        return self.ostudy.direction.name.lower()

    @property
    def study_id(self) -> int:
        return self.ostudy._study_id

    def trials(self, *states: TrialState) -> list[StoredTrial]:
        """Every trial (or those in ``states``), by number."""
        wanted = tuple(OPTUNA_STATES[s] for s in states) or None
        return [stored(t) for t in self.ostudy.get_trials(deepcopy=False, states=wanted)]

    def count(self, *states: TrialState) -> int:
        wanted = tuple(OPTUNA_STATES[s] for s in states) or None
        return len(self.ostudy.get_trials(deepcopy=False, states=wanted))

    def finished_count(self) -> int:
        """Complete and pruned trials: what counts towards the budget."""
        return len(self.ostudy.get_trials(deepcopy=False, states=FINISHED))

    def best(self) -> StoredTrial | None:
        """Optuna's best trial (its tie-breaking, which ``searchlab report`` shows too), or
        None.  One storage query, asked after every trial: no listing of every trial first."""
        try:
            return stored(self.ostudy.best_trial)
        except ValueError:  # no complete trial yet
            return None

    def top(self, k: int) -> list[StoredTrial]:
        """The ``k`` best complete trials, best first (ties: the lower number)."""
        sign = -1.0 if self.direction == "maximize" else 1.0
        complete = self.trials(TrialState.COMPLETE)
        return sorted(complete, key=lambda t: (sign * float(t.value or 0.0), t.number))[:k]

    def trial(self, number: int) -> StoredTrial:
        return stored(self.ostudy.trials[number])

    def attr(self, key: str, default: Any = None) -> Any:
        """A user attr of the study."""
        return self.ostudy.user_attrs.get(key, default)

    def set_attr(self, key: str, value: Any) -> None:
        self.ostudy.set_user_attr(key, value)

    def counts(self) -> dict[str, int]:
        """``n_complete``, ``n_pruned``, ``n_failed`` of the whole study."""
        trials = self.ostudy.get_trials(deepcopy=False)
        return {
            "n_complete": sum(t.state == OptunaState.COMPLETE for t in trials),
            "n_pruned": sum(t.state == OptunaState.PRUNED for t in trials),
            "n_failed": sum(t.state == OptunaState.FAIL for t in trials),
        }

    def plot_copy(self, k: int) -> optuna.Study:
        """An in-memory copy in which only the ``k`` best complete trials keep their
        per-epoch (intermediate) values; trial numbers are kept, so plots name the real
        trials (``report``'s plots take an Optuna study)."""
        keep = {t.number for t in self.top(k)}
        copy = optuna.create_study(study_name=self.name, direction=self.ostudy.direction)
        for t in self.ostudy.get_trials(deepcopy=False):
            if t.number in keep:
                copy.add_trial(t)
            else:  # a placeholder keeps the numbering; it has no curve to draw
                copy.add_trial(optuna.trial.create_trial(state=OptunaState.FAIL))
        return copy


__all__ = [
    "DB_SERVERS",
    "EPOCHS_ATTR",
    "ERROR_ATTR",
    "FINISHED",
    "RUN_ID_ATTR",
    "SETTINGS_KEY",
    "SPACE_ATTR",
    "StoredTrial",
    "StudyStore",
    "check_db_server",
    "describe_changes",
    "is_db_server",
    "open_storage",
    "redact",
    "sqlite_path",
    "study_names",
]
