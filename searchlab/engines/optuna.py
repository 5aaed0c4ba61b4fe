"""The Optuna engine: samplers, storage, the ask/tell loop, budget and resume.

The study lives in an Optuna storage (SQLite by default, any SQLAlchemy URL with
``--storage``).  Running a study again loads it and continues until ``trials`` trials have
completed (pruned trials count, failed ones do not); a grid point that completed is never run
again.  Each trial is one MLflow child run; its id is kept as the Optuna trial's user attr
``mlflow_run_id``.

Several processes (``--workers N``, or the same command on several machines) can run one
study: each trial is claimed under a study-wide lock and kept alive by a heartbeat
(``coordination``).  A session first fails the trials of processes that died and
closes the MLflow runs they left open (``Session.reconcile``), so a study survives a SIGKILL
at any moment.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState as OptunaState

from searchlab import config, coordination
from searchlab import data as data_mod
from searchlab.errors import NotRunError, SearchlabError, StoreError, StudyDefinitionError

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.outcome import TrialResult
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker

log = logging.getLogger(__name__)
ENGINE = "optuna"
RUN_ID_ATTR = "mlflow_run_id"
SPACE_ATTR = "searchlab.space"
FINISHED = (OptunaState.COMPLETE, OptunaState.PRUNED)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL, or raise ``StoreError`` with one line that says why."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    interval = coordination.heartbeat_interval()
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": 60}}
        elif url.startswith(("postgresql", "mysql")):
            kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks heartbeat_interval experimental
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=interval,
                grace_period=coordination.grace_period(interval),
            )
        if url.startswith("sqlite:///"):
            # WAL lets worker processes read while one writes; it is a property of the file.
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return storage
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"Cannot open the Optuna storage {_redact(url)}: its database driver "
            f"{exc.name!r} is not installed. For PostgreSQL: pip install 'searchlab[postgres]'."
        ) from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"Cannot open the Optuna storage {_redact(url)}: {first}. "
            "Check --storage (for PostgreSQL: host, port, user, password, database)."
        ) from exc


def load_stored(name: str, url: str) -> optuna.Study:
    """The stored Optuna study ``name`` for reading results; never creates a store or a study.

    Raises ``StoreError`` when a local SQLite storage file does not exist, and ``NotRunError``
    when the storage holds no study of that name.
    """
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise StoreError(
            f"No Optuna storage at {url[len('sqlite:///'):]}: the study was never run here. "
            "Run it first (searchlab run STUDY_FILE), or pass the --storage it ran with."
        )
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise NotRunError(
            f"Study {name!r} was never run: {_redact(url)} holds no study of that name. Run it "
            "first (searchlab run STUDY_FILE), or pass the --storage it ran with."
        ) from None


def top_trials(ostudy: optuna.Study, k: int) -> optuna.Study:
    """An in-memory copy of ``ostudy`` in which only the ``k`` best complete trials keep their
    per-epoch (intermediate) values; trial numbers are kept, so plots name the real trials."""
    complete = ostudy.get_trials(deepcopy=False, states=(OptunaState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: t.value, reverse=ostudy.direction.name == "MAXIMIZE")
    keep = {t.number for t in ranked[:k]}
    copy = optuna.create_study(study_name=ostudy.study_name, direction=ostudy.direction)
    for t in ostudy.get_trials(deepcopy=False):
        if t.number in keep:
            copy.add_trial(t)
        else:  # a placeholder keeps the numbering; it has no curve to draw
            copy.add_trial(optuna.trial.create_trial(state=OptunaState.FAIL))
    return copy


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def make_sampler(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    if strategy in ("random", "grid", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "bayesian":
        # Optuna 5's TPE defaults are the ones we want: multivariate (params sampled jointly,
        # single objective) and constant_liar (--workers do not all propose the same point).
        # Pruned trials count as finished, also towards the 5 random start-up trials; TPE
        # ranks them below every complete trial (README, "Pruning").  5, not Optuna's 10:
        # studies here run tens of trials, not hundreds.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if strategy == "gp":
        try:
            import torch  # noqa: F401 - GPSampler needs it
        except ImportError:
            raise StudyDefinitionError(
                "Strategy 'gp' uses Optuna's GPSampler, which needs PyTorch: "
                "pip install 'searchlab[gp]' (or torch), or use --strategy bayesian."
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    raise StudyDefinitionError(f"Unknown strategy {strategy!r}.")


#: ``--pruner asha``/``hyperband`` defaults.  A trial may be stopped after its first epoch
#: (the earliest signal there is: a study that needs warm-up epochs says so with
#: ``--prune-min-epochs``) and about a third of the trials that reach a rung go on (rungs at
#: 1, 3, 9, 27 ... epochs; Optuna's own default of 4 keeps a quarter and, at 4 epochs or
#: fewer, leaves a single rung).  Not Optuna's ``bootstrap_count``: it prunes the first trials
#: that reach a rung outright, which in a sequential run throws away the first trials.
PRUNE_MIN_EPOCHS = 1
PRUNE_FACTOR = 3


def make_pruner(options: RunOptions) -> optuna.pruners.BasePruner:
    """``--pruner``: none (never prune), median, asha (successive halving) or hyperband.

    Steps are epochs trained (1, 2, ...).  Strategy ``hyperband`` means random sampling with
    the Hyperband pruner unless another pruner is named.  ``--prune-min-epochs`` and
    ``--prune-factor`` (checked by ``engines.check_pruning``) override the defaults above.
    """
    name = options.pruner
    if name == "none" and options.strategy == "hyperband":
        name = "hyperband"
    min_epochs = options.prune_min_epochs or PRUNE_MIN_EPOCHS
    factor = options.prune_factor or PRUNE_FACTOR
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # pruned from step n_warmup_steps on, and steps are epochs trained
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min_epochs)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_epochs, reduction_factor=factor
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_epochs, max_resource=max(options.epochs, 1), reduction_factor=factor
        )
    raise StudyDefinitionError(f"Unknown pruner {name!r}: choose none, median, asha or hyperband.")


def pruner_args(options: RunOptions) -> str:
    """The settings of the session's pruner, for its parent run's tags."""
    pruner = make_pruner(options)
    if isinstance(pruner, optuna.pruners.NopPruner):
        return ""
    min_epochs = options.prune_min_epochs or PRUNE_MIN_EPOCHS
    if isinstance(pruner, optuna.pruners.MedianPruner):
        return f"min_epochs={min_epochs}"
    return f"min_epochs={min_epochs}, factor={options.prune_factor or PRUNE_FACTOR}"


def grid_points(study: Study) -> list[dict[str, Any]]:
    """The study's grid in the order it runs.  With a transfer builder's ``group_by`` (its
    cut-point parameter, e.g. ``frozen_layers``), points sharing that value run one after the
    other, so the feature cache of a cut point is computed once and reused."""
    points = study.search_space.grid()
    group = getattr(study.model, "group_by", None)
    if group is not None:
        points.sort(key=lambda p: repr(p.get(group)))  # stable: keeps the rest in grid order
    return points


def budget(study: Study, options: RunOptions) -> int | None:
    """How many finished trials the study needs: None means until the timeout."""
    if options.strategy == "grid":
        size = study.search_space.grid_size()
        return min(options.trials, size) if options.trials else size
    if options.trials is None and options.timeout is None:
        raise StudyDefinitionError(
            "The study has no budget: set trials= or timeout= in the study, or pass --trials."
        )
    return options.trials


def load_optuna_study(
    study: Study, storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler
) -> optuna.Study:
    ostudy = optuna.create_study(
        study_name=study.name,
        storage=storage,
        sampler=sampler,
        direction=study.direction,
        pruner=optuna.pruners.NopPruner(),  # not Optuna's default MedianPruner: run() sets it
        load_if_exists=True,
    )
    described = {**study.search_space.describe(), "_objective": study.objective}
    stored = ostudy.user_attrs.get(SPACE_ATTR)
    if stored is None:
        ostudy.set_user_attr(SPACE_ATTR, described)
    elif stored != described:
        changed = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
        raise StudyDefinitionError(
            f"The storage already holds a study named {study.name!r} with a different space or "
            f"objective (differs in: {', '.join(changed)}). Give the study a new name, or use "
            "another --storage."
        )
    if ostudy.direction.name.lower() != study.direction:
        raise StudyDefinitionError(
            f"The storage holds study {study.name!r} with direction "
            f"{ostudy.direction.name.lower()}, but the study file says {study.direction}. "
            "Give the study a new name."
        )
    return ostudy


def _row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    state = {
        OptunaState.COMPLETE: "complete",
        OptunaState.PRUNED: "pruned",
        OptunaState.FAIL: "failed",
        OptunaState.RUNNING: "running",
        OptunaState.WAITING: "waiting",
    }[t.state]
    duration = t.duration.total_seconds() if t.duration else None
    return {
        "number": t.number,
        "state": state,
        "value": t.value if t.state == OptunaState.COMPLETE else None,
        "epochs": t.user_attrs.get("epochs_run"),
        "duration_s": duration,
        "run_id": t.user_attrs.get(RUN_ID_ATTR),
        "params": dict(t.params),
    }


def trial_rows(ostudy: optuna.Study) -> list[dict[str, Any]]:
    return [_row(t) for t in ostudy.get_trials(deepcopy=False)]


def _best(ostudy: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """Optuna's best trial (its tie-breaking, which ``searchlab report`` shows too), or None.

    One storage query, asked after every trial: no listing of every trial first."""
    try:
        return ostudy.best_trial
    except ValueError:  # no complete trial yet
        return None


@dataclass
class Session:
    """One ``searchlab run`` session on a study: its stores, its Optuna study and its
    parent MLflow run (opened here, or the launcher's when this process is a worker)."""

    study: Study
    options: RunOptions
    tracker: MlflowTracker
    storage: Any
    ostudy: optuna.Study
    lock: coordination.StudyLock
    target: int | None
    info: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    @property
    def run_id(self) -> str:
        assert self.tracker.parent_run_id is not None
        return self.tracker.parent_run_id

    def finished_count(self) -> int:
        return len(self.ostudy.get_trials(deepcopy=False, states=FINISHED))

    def reconcile(self) -> list[str]:
        """Fail trials whose process died, then make MLflow agree with Optuna."""
        coordination.fail_stale_trials(self.ostudy)
        trials = self.ostudy.get_trials(deepcopy=False)
        live_sessions = {
            t.user_attrs.get(coordination.SESSION_ATTR)
            for t in trials
            if t.state == OptunaState.RUNNING
        }
        me, grace = coordination.hostname(), coordination.grace_period()

        def session_dead(run: Any) -> bool:
            tags = run.data.tags
            pid = tags.get("searchlab.pid")
            if tags.get("searchlab.host") == me and pid and pid.isdigit():
                return not coordination.pid_alive(int(pid))
            if run.info.run_id in live_sessions:
                return False
            beat = float(tags.get("searchlab.heartbeat") or run.info.start_time / 1000)
            return time.time() - beat > grace

        states = {t.number: _row(t) | {"error": t.user_attrs.get("error")} for t in trials}
        return self.tracker.reconcile(self.study.name, states, session_dead=session_dead)


def open_session(
    study: Study, options: RunOptions, tracker: MlflowTracker, data_source: str = ""
) -> Session:
    """Open both stores and the Optuna study, then start this session's parent run (or
    attach to ``options.parent_run_id``).  Every store problem is raised here, before any
    training; a new session also closes what a crashed one left open."""
    target = budget(study, options)
    if options.strategy == "grid":
        study.search_space.grid()  # refuses continuous parameters without grid values
    tracker.connect()
    storage = open_storage(options.storage)
    ostudy = load_optuna_study(study, storage, make_sampler(options.strategy, 0))
    ostudy.sampler = make_sampler(options.strategy, _sampler_seed(options, len(ostudy.trials)))
    ostudy.pruner = make_pruner(options)
    lock = coordination.StudyLock(
        storage=storage, storage_url=options.storage, study_name=study.name,
        lock_dir=config.home(),
    )
    info = session_info(
        study, options, target, ENGINE, type(ostudy.pruner).__name__, data_source,
        pruner_args=pruner_args(options),
    )
    session = Session(study, options, tracker, storage, ostudy, lock, target, info)
    if options.parent_run_id:
        tracker.attach(options.parent_run_id)
        return session
    tracker.start_study(study.name, info)
    session.reconcile()
    link_session(tracker, study, ostudy, session.finished_count())
    ostudy.set_user_attr(
        f"searchlab.session.{session.run_id}",
        {"host": coordination.hostname(), "pid": os.getpid(), "started": time.time(),
         "tracking_uri": tracker.uri},
    )
    return session


def link_session(
    tracker: MlflowTracker, study: Study, ostudy: optuna.Study, finished: int
) -> None:
    """Tag a new parent run with its process, a liveness heartbeat, and the study it continues
    (Optuna study id, trials finished before it, the previous session's run)."""
    previous = tracker.previous_session(study.name)
    tracker.set_session_tags({
        "searchlab.host": coordination.hostname(),
        "searchlab.pid": str(os.getpid()),
        "searchlab.heartbeat": str(time.time()),
        "searchlab.optuna_study_id": str(ostudy._study_id),
        "searchlab.resumed_with": str(finished),
        **({"searchlab.previous_session": previous} if previous else {}),
    })


def session_info(
    study: Study,
    options: RunOptions,
    target: int | None,
    engine: str,
    pruner: str,
    data_source: str = "",
    pruner_args: str = "",
) -> dict[str, Any]:
    """What a session's parent run records (tags, ``space.*`` and ``run_params`` params);
    both engines use it, so their MLflow runs have the same structure."""
    from searchlab import backend

    info: dict[str, Any] = {
        "strategy": options.strategy,
        "engine": engine,
        "objective": study.objective,
        "direction": study.direction,
        "budget": target if target is not None else "timeout",
        "epochs": options.epochs,
        "pruner": pruner,
        "seed": options.seed,
        "storage": _redact(options.storage),
        "optuna_study": study.name,
        "precision": options.precision,
        "space": study.search_space.describe(),
        "run_params": {"precision": options.precision},
    }
    if data_source:
        info["data"] = data_source
    if pruner_args:  # the pruner's settings (tag searchlab.pruner_args)
        info["pruner_args"] = pruner_args
    info.update(backend.session_info())  # backend, versions, devices: tags of the parent run
    return info


def trial_tags(study: Study, options: RunOptions, engine: str) -> dict[str, str]:
    """Tags on every trial run of a session (and its re-evaluation runs)."""
    return {
        "searchlab.study": study.name,
        "searchlab.strategy": options.strategy,
        "searchlab.engine": engine,
        **({"searchlab.worker": options.worker} if options.one_of_several else {}),
        **(
            {"searchlab.cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]}
            if "CUDA_VISIBLE_DEVICES" in os.environ
            else {}
        ),
        **{str(k): str(v) for k, v in study.tags.items()},
    }


def _sampler_seed(options: RunOptions, n_trials: int) -> int:
    """A plain run on a SQLite storage is reproducible from its seed.  Processes that may run
    side by side (workers, or a shared server storage that other machines join) get distinct
    seeds, or their samplers would propose the same params."""
    seed = options.seed + n_trials
    if options.one_of_several or not options.storage.startswith("sqlite:"):
        seed += zlib.crc32(f"{coordination.hostname()}/{os.getpid()}".encode())
    return seed % (2**32)


def close_session(session: Session, status: str, counts: Mapping[str, int], spec: Any) -> dict[str, Any]:
    """Reconcile, write the summary and artifacts on the parent run, and close it."""
    summary = _summary(session.ostudy, counts, session.started)
    try:
        try:
            session.reconcile()
        except Exception as exc:  # the stores may be what failed; closing comes first
            log.warning("could not reconcile MLflow with Optuna: %s", exc)
        if status == "FINISHED" and spec is not None:
            _log_study_artifacts(session.study, session.ostudy, spec, session.tracker, summary)
    finally:
        session.tracker.end_study(summary, status)
    return summary


def trial_spec(study: Study, options: RunOptions) -> Any:
    from searchlab import trial as trial_mod

    loaded = data_mod.load(study.dataset, options.data_dir)
    return trial_mod.TrialSpec(
        build=study.model,
        data=loaded,
        epochs=options.epochs,
        objective=study.objective,
        direction=study.direction,
        batch_size=study.batch_size,
        seed=options.seed,
        precision=options.precision,
    )


def run(
    study: Study,
    options: RunOptions,
    tracker: MlflowTracker,
    listener: SearchListener,
) -> dict[str, Any]:
    """Run or continue ``study``; see the module docstring.

    With ``options.parent_run_id`` this process is one worker of a session another process
    opened: it runs trials until the budget is met and leaves the parent run to its owner.
    """
    budget(study, options)
    spec = trial_spec(study, options)  # a missing dataset fails before the stores are touched
    session = open_session(study, options, tracker, spec.data.source)
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    if options.parent_run_id:
        try:
            recycle = work(session, spec, listener, counts)
        finally:
            tracker.close_all("FAILED")  # only this worker's own trial runs are open
        return {**_summary(session.ostudy, counts, session.started), "recycle": recycle}
    status = "FAILED"
    listener.started(study.name, session.finished_count(), session.target, session.info)
    try:
        work(session, spec, listener, counts)
        if options.reeval_top:
            from searchlab import reeval

            with tempfile.TemporaryDirectory(prefix="searchlab-reeval-") as tmp:
                reeval.reevaluate(
                    session.ostudy, spec, tracker, trial_tags(study, options, ENGINE),
                    options.reeval_top,
                    options.reeval_seeds, Path(tmp),
                )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary = close_session(session, status, counts, spec)
        listener.finished(summary)
    return summary


def work(
    session: Session, spec: Any, listener: SearchListener, counts: dict[str, int]
) -> bool:
    """Claim and run trials until the budget or the time limit is met.

    Returns True when it stopped early because this process grew by more than
    ``options.recycle_mb`` (a worker then exits and its launcher starts a fresh one)."""
    options, tracker = session.options, session.tracker
    grid = grid_points(session.study) if options.strategy == "grid" else None
    base_tags = trial_tags(session.study, options, ENGINE)
    consecutive_failures = 0
    baseline: float | None = None
    with tempfile.TemporaryDirectory(prefix="searchlab-trial-") as tmp:
        while True:
            if options.timeout is not None and time.monotonic() - session.started >= options.timeout:
                log.info("time budget of %ss reached", options.timeout)
                return False
            done = session.finished_count()
            claimed = coordination.claim_trial(
                session.ostudy, session.lock, target=session.target, grid=grid,
                session=session.run_id, suggest=session.study.search_space.suggest,
            )
            if claimed.failed_stale:
                session.reconcile()
            if claimed.state is coordination.Claim.DONE:
                return False
            if claimed.state is coordination.Claim.WAIT:
                time.sleep(coordination.wait_seconds())
                continue
            tracker.set_session_tags({"searchlab.heartbeat": str(time.time())})
            assert claimed.trial is not None
            result = _one_trial(
                session, claimed.trial, spec, listener, base_tags, Path(tmp), done
            )
            counts[result.state.value] += 1
            consecutive_failures = failure_streak(
                consecutive_failures, result, options.max_failures
            )
            if options.recycle_mb is not None:
                rss = coordination.rss_mb()
                baseline = rss if baseline is None else baseline
                if rss - baseline > options.recycle_mb:
                    log.info("worker grew %.0f MB since its first trial: recycling", rss - baseline)
                    return True


def failure_streak(streak: int, result: TrialResult, max_failures: int) -> int:
    """Failed trials in a row after ``result``; stops the study once that reaches
    ``max_failures`` (``--max-failures``)."""
    if result.state.value != "failed":
        return 0
    streak += 1
    if streak >= max_failures:
        raise SearchlabError(
            f"Stopped the study after {streak} failed trials in a row "
            f"(--max-failures {max_failures}); last error: "
            f"{(result.error or '').splitlines()[0]}. Fix the study (or raise "
            "--max-failures); finished trials are kept."
        )
    return streak


def _one_trial(
    session: Session,
    otrial: optuna.Trial,
    spec: Any,
    listener: SearchListener,
    base_tags: Mapping[str, str],
    tmp: Path,
    done: int,
) -> TrialResult:
    from searchlab.trial import TrialResult, TrialState, run_trial

    ostudy, tracker, target = session.ostudy, session.tracker, session.target
    heartbeat = coordination.Heartbeat(
        session.storage, otrial._trial_id, coordination.heartbeat_interval()
    ).start()
    try:
        params = session.study.search_space.suggest(otrial)
        number = otrial.number
        listener.trial_started(number, done + 1, target, params)
        tags = {
            **base_tags,
            "searchlab.input_shape": ",".join(map(str, spec.data.input_shape)),
            "searchlab.num_classes": str(spec.data.num_classes),
        }
        run_id: str | None = None

        def on_epoch(epoch: int, logs: dict[str, float]) -> None:
            assert run_id is not None
            tracker.log_epoch(run_id, epoch, logs)
            value = logs.get(spec.objective)
            if value is not None and math.isfinite(value):
                # step = epochs trained, as pruners expect; also Optuna's learning curves
                otrial.report(value, epoch + 1)
                # pruning after the last epoch saves nothing and would discard a trained model
                if epoch + 1 < spec.epochs and otrial.should_prune():
                    from searchlab.errors import TrialPruned

                    raise TrialPruned(epoch)

        try:
            run_id = tracker.start_trial(number, params, tags)
            otrial.set_user_attr(RUN_ID_ATTR, run_id)
            result = run_trial(number, params, spec, tmp / f"trial-{number}", on_epoch)
        except BaseException as exc:  # Ctrl-C, a study-level or store error: close, then stop
            error = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            result = TrialResult(number, params, TrialState.FAILED, error=error)
            _finish(ostudy, otrial, tracker, run_id, result)
            raise
        _finish(ostudy, otrial, tracker, run_id, result)
    finally:
        heartbeat.stop()
    best = _best(ostudy)
    listener.trial_finished(
        result,
        {"number": best.number, "value": best.value, "params": best.params} if best else None,
    )
    return result


def _finish(
    ostudy: optuna.Study,
    otrial: optuna.Trial,
    tracker: MlflowTracker,
    run_id: str | None,
    result: Any,
) -> None:
    """MLflow first, then Optuna: a crash in between leaves Optuna RUNNING (it is failed as
    stale on resume), never a COMPLETE Optuna trial without its MLflow weights."""
    try:
        otrial.set_user_attr("epochs_run", result.epochs_run)
        if result.error:
            otrial.set_user_attr("error", result.error[:2000])
        if run_id is not None:
            tracker.end_trial(run_id, result)
    except Exception:
        ostudy.tell(otrial, state=OptunaState.FAIL, skip_if_finished=True)
        raise
    state = result.state.value
    try:
        if state == "complete":
            ostudy.tell(otrial, result.value, skip_if_finished=True)
        elif state == "pruned":
            ostudy.tell(otrial, state=OptunaState.PRUNED, skip_if_finished=True)
        else:
            ostudy.tell(otrial, state=OptunaState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another process failed it as stale (its heartbeats did not reach the store); the
        # next reconcile marks its MLflow run FAILED too, and the point is run again.
        log.warning("trial %s was failed as stale by another worker", otrial.number)


def _summary(ostudy: optuna.Study, counts: Mapping[str, int], started: float) -> dict[str, Any]:
    trials = ostudy.get_trials(deepcopy=False)
    best = _best(ostudy)
    return {
        "n_complete": sum(t.state == OptunaState.COMPLETE for t in trials),
        "n_pruned": sum(t.state == OptunaState.PRUNED for t in trials),
        "n_failed": sum(t.state == OptunaState.FAIL for t in trials),
        "session_complete": counts["complete"],
        "session_pruned": counts["pruned"],
        "session_failed": counts["failed"],
        "session_seconds": time.monotonic() - started,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "best_run_id": best.user_attrs.get(RUN_ID_ATTR) if best else None,
        **_reeval_summary(ostudy),
    }


def _reeval_summary(ostudy: optuna.Study) -> dict[str, Any]:
    """Re-evaluation's choice (by mean objective over seeds), when the study has one."""
    from searchlab import reeval

    return reeval.summary(ostudy)


def _log_study_artifacts(
    study: Study, ostudy: optuna.Study, spec: Any, tracker: MlflowTracker, summary: Mapping[str, Any]
) -> None:
    """The trials table (CSV) and the best model (.keras) go on the session's parent run."""
    from searchlab import table

    with tempfile.TemporaryDirectory(prefix="searchlab-study-") as tmp:
        frame = table.trials_frame(trial_rows(ostudy), study.direction)
        tracker.log_artifact(table.write_csv(frame, Path(tmp) / "trials.csv"))
        run_id = summary.get("selected_run_id") or summary.get("best_run_id")
        params = summary.get("selected_params") or summary["best_params"]
        if not run_id:
            return
        from searchlab import trial as trial_mod
        from searchlab.data import info_of

        weights = tracker.download(run_id, "weights", Path(tmp))  # either form: see trial
        model = trial_mod.load_trained(spec.build, params, info_of(spec.data), weights)
        path = Path(tmp) / "model.keras"
        model.save(path)
        tracker.log_artifact(path, "best_model")
