"""The session loop: one place that runs a study, whichever engine proposes the params.

A session (one ``searchlab run``, or one worker of it) goes:

1. ``prepare`` then ``open_session``: check the engine's settings and the budget, load the
   data and find a transfer backbone's weights (a missing dataset or weights file fails
   before any store is touched: a run that cannot train writes nothing), open the Optuna study (``store``) and the
   MLflow session run (``tracking``), close what a crashed session left open
   (``Session.reconcile``), and let the engine open its own state.
2. ``work``: claim a trial under the study lock (``coordination.claim_trial``: stale trials
   failed, budget checked, the engine's proposal asked for in the storage), run it
   (``run_one``: a heartbeat, the MLflow child run, ``trial.run_trial`` with a per-epoch
   callback that logs, reports and may prune), and record it exactly once: MLflow first,
   then Optuna (``finish``), then the engine (``Engine.tell``).  Failed trials in a row
   stop the study at ``--max-failures``; a worker that grew by ``--recycle-mb`` returns so
   its launcher can start a fresh one.
3. ``close_session``: reconcile again, write the summary, the trials table and the best
   model on the parent run, close it.  ``--reeval-top`` re-trains the best configurations
   before that (``reeval``).

The study itself lives in the stores, so a study survives a SIGKILL at any moment: the next
session fails what the dead one was running and runs it again -- or, on the Optuna engine,
goes on with it from its last finished epoch.  Resume: each trial keeps a checkpoint
(``trial``, ``checkpoint``) in ``<SEARCHLAB_HOME>/checkpoints/<its MLflow run id>``, named by
its Optuna trial's ``searchlab.checkpoint`` attr; a trial whose process died
(``coordination``: resumable trials) is taken over by the next claim: the same Optuna trial,
the same MLflow run opened again (``Tracker.resume_trial``), epochs the run already has not
logged twice.  Ctrl-C or SIGTERM during a trial with a checkpoint pauses it rather than
failing it: its run ends KILLED (tag ``searchlab.paused``), its Optuna trial stays RUNNING,
and the next session goes on with it.  The folder is removed once the trial is recorded.
``workers`` runs the same session with the trials in child processes (``searchlab run`` by
default, ``--workers N``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab import checkpoint, config, coordination, engines, interrupts
from searchlab.data import class_names_json, classes_tag, head
from searchlab.errors import SearchlabError, TrialPruned
from searchlab.outcome import Claim, TrialResult, TrialState
from searchlab.store import ACTIVE_ATTR, RUN_ID_ATTR, StoredTrial, StudyStore, redact

if TYPE_CHECKING:
    from searchlab.data import Data
    from searchlab.engines import Engine, RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import DataInput, RunRecord, Tracker
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)
#: how a trial is trained: ``trial.run_trial``'s signature (tests hand the runner a stub)
TrainFn = Callable[..., TrialResult]
#: raw inputs the best model's MLflow signature is inferred from
MODEL_SAMPLE = 2


@dataclass
class Session:
    """One session on a study: its engine, its stores, and its parent MLflow run (opened
    here, or the launcher's when this process is a worker)."""

    study: Study
    options: RunOptions
    engine: Engine
    tracker: Tracker
    store: StudyStore
    lock: coordination.StudyLock
    target: int | None
    info: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    #: why the session's first trial without the feature cache had none (``note_cache``)
    cache_reason: str | None = None

    @property
    def resumes(self) -> bool:
        """Whether this session's trials keep checkpoints and are resumed: the Optuna
        engine (the keras-tuner one's oracle knows nothing of a trial taken over)."""
        return self.engine.name == "optuna"

    @property
    def run_id(self) -> str:
        run_id = self.tracker.session_id
        if run_id is None:
            raise RuntimeError("the session's parent run is not open")
        return run_id

    def finished_count(self) -> int:
        return self.store.finished_count()

    def reconcile(self) -> list[str]:
        """Fail trials whose process died (except those to resume), then make MLflow agree
        with Optuna."""
        coordination.fail_stale_trials(self.store, resume=self.resumes)
        trials = self.store.trials()
        for t in trials:  # a process killed between recording a trial and removing its folder
            folder = t.attrs.get(coordination.CHECKPOINT_ATTR)
            if folder and t.state is not TrialState.RUNNING and Path(folder).exists():
                checkpoint.remove(Path(folder))
        live_sessions = {
            t.attrs.get(coordination.SESSION_ATTR) for t in trials if t.state is TrialState.RUNNING
        }
        me, grace = coordination.hostname(), coordination.grace_period()

        def session_dead(run: RunRecord) -> bool:
            if run.run_id in live_sessions:  # a trial of it runs: alive, even if the process
                return False  # that started it is gone (a shared session's other hosts)
            pid = run.tags.get("searchlab.pid")
            if run.tags.get("searchlab.host") == me and pid and pid.isdigit():
                # this process runs one session at a time: any other one it recorded is over
                started = run.tags.get(coordination.START_ATTR)
                if coordination.is_me(int(pid), started):
                    return True
                return not coordination.process_alive(int(pid), started)
            beat = float(run.tags.get("searchlab.heartbeat") or run.start_time)
            return time.time() - beat > grace

        states = {
            t.number: {"state": t.state, "value": t.value, "error": t.error, "run_id": t.run_id}
            for t in trials
        }
        return self.tracker.reconcile(self.study.name, states, session_dead=session_dead)


# ---------------------------------------------------------------------------- the session


def prepare(
    study: Study, options: RunOptions, *, check: bool = True
) -> tuple[Engine, int | None, TrialSpec]:
    """The engine (its settings checked), the budget, and the trials' spec with the data
    loaded and a transfer backbone's weights file found (or downloaded): every mistake in the study or the flags is raised here, before a store is
    touched.  ``check``: also build one model and check it against the data and the
    objective (``trial.preflight``; once per session, not in each worker)."""
    engine = engines.create(study, options)
    engine.check()
    if options.session_key and options.reeval_top:
        raise SearchlabError(
            "--reeval-top re-trains after the search, in one process; a shared --session has "
            "many. Drop --reeval-top, and re-evaluate afterwards with searchlab run "
            "--reeval-top K --trials <the trials done> (without --session)."
        )
    target = engines.budget(study, options)
    spec = trial_spec(study, options)
    fetch_weights = getattr(spec.build, "fetch_weights", None)  # models.Transfer
    if fetch_weights is not None:  # missing ImageNet weights stop the run here, not in a trial
        fetch_weights(tuple(spec.data.input_shape))
    if check:
        from searchlab import training as trial_mod

        trial_mod.preflight(spec, study.search_space.defaults())
    return engine, target, spec


def open_session(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    engine: Engine,
    target: int | None,
    data_source: str = "",
    settings: Mapping[str, str] | None = None,
) -> Session:
    """Open both stores and the Optuna study, then start this session's parent run (or
    attach to ``options.parent_run_id``).  Every store problem is raised here, before any
    training, and a run that fails here writes nothing: the Optuna storage is opened first
    (a bad ``--storage`` fails before MLflow is touched), and what it created is discarded
    when the MLflow store then fails.  A new session also closes what a crashed one left
    open.  ``settings`` (``result_settings``) are logged on the parent run."""
    described = {**study.search_space.describe(), "_objective": study.objective}
    store = StudyStore.open(
        study.name,
        options.storage,
        direction=study.goal,
        described=described,
        sampler=engine.sampler(0),
        settings=settings,
        allow_changed_settings=options.allow_changed_settings,
    )
    try:
        tracker.connect()
    except BaseException:
        store.discard()
        raise
    store.use(engine.sampler(store.count()))
    engine.open(store)
    try:
        lock = coordination.StudyLock(
            storage=store.storage,
            storage_url=options.storage,
            study_name=study.name,
            lock_dir=config.home(),
        )
        info = session_info(study, options, target, engine, data_source, settings)
        if store.changed_settings:  # --allow-changed-settings: the session says what it changed
            from searchlab.store import describe_changes

            info["changed_settings"] = describe_changes(store.changed_settings)
        session = Session(study, options, engine, tracker, store, lock, target, info)
        if options.parent_run_id:
            tracker.attach(options.parent_run_id)
            return session
        with interrupts.deferred():  # a parent run is never left open without its links
            if options.session_key:
                if not open_shared(session, options.session_key):
                    return session  # joined: the process that started the shared session linked it
            else:
                tracker.start_session(study.name, info)
            try:
                session.reconcile()
                link_session(session)
            except BaseException:
                tracker.end_session({}, "FAILED")
                raise
    except BaseException:
        engine.close()
        raise
    return session


# ---------------------------------------------------------------------- shared sessions
#
# ``searchlab run --session KEY`` (``$SEARCHLAB_SESSION``) on several machines -- a SLURM job
# array, a Kubernetes Job with ``parallelism: N`` -- runs one session: one MLflow parent run
# for every process that names the same key.  Under the study lock the first one starts the
# parent run and records it in the Optuna study (user attr ``SHARED_ATTR + KEY``); the others
# attach to it.  Each runs trials until the budget is met; then, under the lock again, the
# process that sees no trial still running is the last: it marks the session closed and
# closes it as a single process would (trials table, best model, summary).  The others leave
# the parent run open.  A process that comes after the close has nothing to do
# (``SessionOver``).

#: Optuna study user attr (with the key appended): ``{"run_id", "closed"}`` of a shared session
SHARED_ATTR = "searchlab.shared_session."


def open_shared(session: Session, key: str) -> bool:
    """Start the shared session ``key``'s parent run, or attach to it; True when this
    process started it.  Raises ``SessionOver`` when its last process has closed it."""
    from searchlab.errors import SessionOver

    tracker, store = session.tracker, session.store
    with session.lock.held():
        known = store.attr(SHARED_ATTR + key)
        status = tracker.run_status(known["run_id"]) if known else None
        if known and not known.get("closed") and status == "RUNNING":
            tracker.attach(known["run_id"])
            return False
        if known and not known.get("closed"):
            raise SessionOver(
                f"Session {key!r} of study {session.study.name!r} was not closed by searchlab: "
                f"its parent run {known['run_id']} is {status or 'gone from the tracking store'} "
                "(its process died?). Use another --session key to continue the study."
            )
        if known:
            raise SessionOver(
                f"Session {key!r} of study {session.study.name!r} is over (its last process "
                "closed it); nothing left to do. Use another --session key to continue the study."
            )
        tracker.start_session(session.study.name, {**session.info, "session_key": key})
        store.set_attr(SHARED_ATTR + key, {"run_id": session.run_id, "closed": False})
    return True


def end_session(
    session: Session, status: str, counts: Mapping[TrialState, int], spec: TrialSpec | None
) -> dict[str, Any]:
    """End this process's part of the session: ``close_session`` for a session of its own;
    for a shared one, close it only if this process is the last (the summary then counts
    every process's trials), else leave the parent run to the others."""
    key = session.options.session_key
    if not key:
        return close_session(session, status, counts, spec)
    last = False
    if status == "FINISHED":
        with session.lock.held():
            known = session.store.attr(SHARED_ATTR + key) or {}
            running = session.store.count(TrialState.RUNNING)
            if known.get("run_id") == session.run_id and not known.get("closed") and not running:
                session.store.set_attr(SHARED_ATTR + key, {**known, "closed": True})
                last = True
    if last:
        session.tracker.attach(session.run_id, own=True)
        return close_session(session, status, session_counts(session), spec)
    session.tracker.leave()
    return {**summarize(session, counts), "shared_session": key, "left_open": True}


def session_counts(session: Session) -> dict[TrialState, int]:
    """The trials the session ended, by state, whichever process ran them."""
    counts = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAILED: 0}
    for t in session.store.trials(*counts):
        if t.attrs.get(coordination.SESSION_ATTR) == session.run_id:
            counts[t.state] += 1
    return counts


def link_session(session: Session) -> None:
    """Tag a new parent run with its process, a liveness heartbeat, and the study it continues
    (Optuna study id, trials finished before it, the previous session's run); record the
    session on the Optuna study."""
    tracker, store = session.tracker, session.store
    previous = tracker.previous_session(session.study.name)
    started = coordination.process_start()
    tracker.tag_session(
        {
            "searchlab.host": coordination.hostname(),
            "searchlab.pid": str(os.getpid()),
            **({coordination.START_ATTR: started} if started else {}),
            "searchlab.heartbeat": str(time.time()),
            "searchlab.optuna_study_id": str(store.study_id),
            "searchlab.resumed_with": str(session.finished_count()),
            **({"searchlab.previous_session": previous} if previous else {}),
        }
    )
    store.set_attr(
        f"searchlab.session.{session.run_id}",
        {
            "host": coordination.hostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "tracking_uri": redact(tracker.uri),
        },
    )


def session_info(
    study: Study,
    options: RunOptions,
    target: int | None,
    engine: Engine,
    data_source: str = "",
    settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What a session's parent run records (tags, ``space.*`` and ``run_params`` params:
    the precision and the other ``settings`` that change results)."""
    from searchlab import backend

    engine_info = engine.info()
    info: dict[str, Any] = {
        "strategy": options.strategy,
        "engine": engine.name,
        "objective": study.objective,
        "direction": study.goal,
        "budget": target if target is not None else "timeout",
        "epochs": options.epochs,
        "pruner": engine_info["pruner"],
        "seed": options.seed,
        "storage": redact(options.storage),
        "optuna_study": study.name,
        "precision": options.precision,
        "space": study.search_space.describe(),
        "run_params": {"precision": options.precision, **(settings or {})},
    }
    if data_source:
        info["data"] = data_source
    if settings and "class_names" in settings:  # also a tag: export and users read it there
        info["class_names"] = settings["class_names"]
    if engine_info.get("pruner_args"):  # the pruner's settings (tag searchlab.pruner_args)
        info["pruner_args"] = engine_info["pruner_args"]
    info.update(backend.session_info())  # backend, versions, devices: tags of the parent run
    return info


def result_settings(study: Study, options: RunOptions, data: Data) -> dict[str, str]:
    """The session's settings that change what a trial gives, by name: the epochs, the
    data (name, subset, a digest of the arrays), the precision and what the model builder
    reports of itself (``settings()``: a ``Transfer``'s backbone, its weights' source, the
    input size...).  Params of the parent run; a study resumed with other values mixes
    incomparable trials (see ``StudyStore.open``)."""
    subset = study.dataset.subset
    parts = {"train": subset} if isinstance(subset, int) else dict(subset or ())
    settings = {
        "epochs": str(options.epochs),
        "data": study.dataset.label,
        "subset": ",".join(f"{k}={v}" for k, v in sorted(parts.items())) or "all",
        "data_digest": data.fingerprint,
        "precision": options.precision,
    }
    if data.class_names is not None:  # an image folder: its classes, by class id
        settings["class_names"] = class_names_json(data.class_names)
    if study.backbone_seed is not None:  # every trial's initial weights come from it
        settings["backbone_seed"] = str(study.backbone_seed)
    describe = getattr(study.model, "settings", None)
    if callable(describe):
        settings.update({f"model.{k}": str(v) for k, v in describe().items()})
    return settings


def data_inputs(study: Study, data: Data) -> list[DataInput]:
    """The splits a trial trains and validates on, as MLflow dataset inputs."""
    from searchlab.tracking import DataInput

    source = data.source if not data.source.startswith("loader ") else ""
    return [
        # inputs that stream from disk: MLflow's schema and profile from their first rows
        DataInput(study.dataset.label, context, data.digest(split), head(x), y, source)
        for context, split, x, y in (
            ("train", "train", data.x_train, data.y_train),
            ("validation", "val", data.x_val, data.y_val),
        )
    ]


def trial_tags(study: Study, options: RunOptions, engine: str) -> dict[str, str]:
    """Tags on every trial run of a session (and its re-evaluation runs)."""
    return {
        "searchlab.study": study.name,
        "searchlab.strategy": options.strategy,
        "searchlab.engine": engine,
        **({"searchlab.worker": options.worker} if options.one_of_several else {}),
        # a shared session's trials say which machine ran them
        **({"searchlab.host": coordination.hostname()} if options.session_key else {}),
        **(
            {"searchlab.cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]}
            if "CUDA_VISIBLE_DEVICES" in os.environ
            else {}
        ),
        **{str(k): str(v) for k, v in study.tags.items()},
    }


def trial_spec(study: Study, options: RunOptions) -> TrialSpec:
    """What every trial of the session shares: the builder, the loaded data, the settings."""
    from searchlab import data as data_mod
    from searchlab import training as trial_mod

    return trial_mod.TrialSpec(
        build=study.model,
        data=data_mod.load(study.dataset, options.data_dir),
        epochs=options.epochs,
        objective=study.objective,
        direction=study.goal,
        batch_size=study.batch_size,
        seed=options.seed,
        precision=options.precision,
        fit=study.fit,
        executions=options.executions_per_trial or study.executions_per_trial,
        max_model_size=study.max_model_size,
        cache=study.cache,
        backbone_seed=study.backbone_seed,
    )


def run(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    listener: SearchListener | None = None,
    *,
    train: TrainFn | None = None,
) -> dict[str, Any]:
    """Run (or continue) ``study`` in this process until its budget is met; return the
    session summary.  ``train`` replaces ``trial.run_trial`` (tests).

    With ``options.parent_run_id`` this process is one worker of a session another process
    opened: it runs trials until the budget is met and leaves the parent run to its owner;
    its summary has ``recycle``: True when it stopped to shed memory (``--recycle-mb``).
    """
    from searchlab.tracking import user_mlflow

    listener = listener or engines.NullListener()
    # the stand-in trainers of tests train nothing: nothing to check before the search
    check = train is None and not options.parent_run_id
    with user_mlflow(tracker):  # before any user code: its own MLflow calls stay in the study
        engine, target, spec = prepare(study, options, check=check)
        interrupts.check()  # one dropped while the data loaded: stop before a store is touched
        settings = result_settings(study, options, spec.data)
        session = open_session(study, options, tracker, engine, target, spec.data.source, settings)
        try:
            return _run_session(session, spec, listener, train)
        finally:
            engine.close()


def _run_session(
    session: Session, spec: TrialSpec, listener: SearchListener, train: TrainFn | None
) -> dict[str, Any]:
    """``run`` once the session is open: its trials, then its close."""
    study, options, tracker = session.study, session.options, session.tracker
    counts = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAILED: 0}
    if options.parent_run_id:
        try:
            recycle = work(session, spec, listener, counts, train)
        except KeyboardInterrupt:
            interrupts.acknowledge()
            raise
        finally:
            with interrupts.deferred():
                tracker.close_all("FAILED")  # only this worker's own trial runs are open
        return {**summarize(session, counts), "recycle": recycle}
    status = "FAILED"
    try:
        listener.started(study.name, session.finished_count(), session.target, session.info)
        work(session, spec, listener, counts, train)
        if options.reeval_top:
            reevaluate(session, spec)
        status = "FINISHED"
    except KeyboardInterrupt:
        interrupts.acknowledge()  # closing the session below is not cut short by it
        status = "KILLED"
        raise
    finally:
        summary = end_session(session, status, counts, spec)
        listener.finished(summary)
    return summary


def summarize(session: Session, counts: Mapping[TrialState, int]) -> dict[str, Any]:
    """The session summary: the study's counts, this session's, the best trial and, after
    re-evaluation, the configuration it selected."""
    from searchlab import reeval

    best = session.store.best()
    return {
        **session.store.counts(),
        "session_complete": counts[TrialState.COMPLETE],
        "session_pruned": counts[TrialState.PRUNED],
        "session_failed": counts[TrialState.FAILED],
        "session_seconds": time.monotonic() - session.started,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "best_run_id": best.run_id if best else None,
        **reeval.summary(session.store),
    }


def close_session(
    session: Session, status: str, counts: Mapping[TrialState, int], spec: TrialSpec | None
) -> dict[str, Any]:
    """Reconcile, write the summary and artifacts on the parent run, and close it.

    A signal does not cut this short (``interrupts.deferred``): an interrupt that arrives
    meanwhile is raised once the parent run is closed."""
    with interrupts.deferred():
        summary: dict[str, Any] = {}
        try:
            summary = summarize(session, counts)
            try:
                session.reconcile()
            except Exception as exc:  # the stores may be what failed; closing comes first
                log.warning("could not reconcile MLflow with Optuna: %s", exc)
            if status == "FINISHED" and spec is not None:
                log_study_artifacts(session, spec, summary)
        finally:
            session.tracker.end_session(summary, status)
    return summary


def reevaluate(session: Session, spec: TrialSpec) -> None:
    """``--reeval-top``: re-train the best configurations with other seeds."""
    from searchlab import reeval

    options = session.options
    with tempfile.TemporaryDirectory(prefix="searchlab-reeval-") as tmp:
        reeval.reevaluate(
            session.store,
            spec,
            session.tracker,
            trial_tags(session.study, options, session.engine.name),
            options.reeval_top,
            options.reeval_seeds,
            Path(tmp),
        )


def log_study_artifacts(session: Session, spec: TrialSpec, summary: dict[str, Any]) -> None:
    """The trials table (CSV) and the best model go on the session's parent run: the
    complete Keras model (also for a trial trained on cached features), rebuilt from the
    trial's weights and logged as an MLflow Model (``Tracker.log_model``); registered too
    with ``options.register``.  Adds ``model_uri`` (and ``registered``) to ``summary``."""
    from searchlab import table
    from searchlab import training as trial_mod
    from searchlab.data import info_of

    tracker = session.tracker
    with tempfile.TemporaryDirectory(prefix="searchlab-study-") as tmp:
        rows = [t.row() for t in session.store.trials()]
        frame = table.trials_frame(rows, session.study.goal)
        tracker.log_artifact(table.write_csv(frame, Path(tmp) / "trials.csv"))
        run_id = summary.get("selected_run_id") or summary.get("best_run_id")
        params = summary.get("selected_params") or summary["best_params"]
        if not run_id:
            return
        weights = tracker.download(run_id, "weights", Path(tmp))  # either form: see trial
        model = trial_mod.load_trained(spec.build, params, info_of(spec.data), weights)
        try:
            log_best_model(session, spec, summary, model, run_id)
        except (ValueError, TypeError) as exc:  # its inputs are not the data's (a HyperModel
            # fit that crops or transforms x): the trials' weights are kept, the study is done
            log.warning(
                "the best model was not logged as an MLflow Model: it does not take the "
                "study's inputs as they are (%s)",
                _first_line(str(exc)),
            )


def log_best_model(
    session: Session, spec: TrialSpec, summary: dict[str, Any], model: Any, run_id: str
) -> None:
    """Log ``model``, trial run ``run_id``'s complete model, as the session's MLflow Model
    and register it when the session was asked to (``--register``)."""
    from searchlab import backend
    from searchlab.tracking import TRIAL_RUN_TAG, ModelScore

    study, tracker = session.study, session.tracker
    number = summary.get("selected_trial")
    number = summary["best_trial"] if number is None else number
    value = session.store.trial(int(number)).value
    tags = {
        "searchlab.study": study.name,
        "searchlab.trial": str(number),
        TRIAL_RUN_TAG: run_id,
        "searchlab.objective": study.objective,
    }
    if spec.data.class_names is not None:  # predicted class id i is the i-th name
        tags["searchlab.class_names"] = class_names_json(spec.data.class_names)
    x = spec.data.x_val if len(spec.data.x_val) else spec.data.x_train
    sample = x[:MODEL_SAMPLE]
    uri = tracker.log_model(
        model,
        (sample, backend.outputs_of(model, sample)),
        requirements=backend.model_requirements(),
        tags=tags,
        params=session.store.trial(int(number)).params,
        trial_run=run_id,
    )
    summary["model_uri"] = uri
    if session.options.register and value is not None:
        score = ModelScore(study.objective, study.goal, float(value))
        summary["registered"] = tracker.register_model(
            uri, session.options.register, score, tags=tags
        )


# ------------------------------------------------------------------------------ the trials


def work(
    session: Session,
    spec: TrialSpec,
    listener: SearchListener,
    counts: dict[TrialState, int],
    train: TrainFn | None = None,
) -> bool:
    """Claim and run trials until the budget or the time limit is met.

    Returns True when it stopped early because this process grew by more than
    ``options.recycle_mb`` (a worker then exits and its launcher starts a fresh one)."""
    options, tracker = session.options, session.tracker
    base_tags = trial_tags(session.study, options, session.engine.name)
    streak = 0
    early: TrialResult | None = None  # the last trial that failed before its first epoch
    baseline: float | None = None
    with tempfile.TemporaryDirectory(prefix="searchlab-trial-") as tmp:
        while True:
            interrupts.check()  # a Ctrl-C that was lost on its way stops the study here
            if (
                options.timeout is not None
                and time.monotonic() - session.started >= options.timeout
            ):
                log.info("time budget of %ss reached", options.timeout)
                return False
            done = session.finished_count()
            # A claim is whole or not at all; an interrupt meanwhile is raised by the trial's
            # first check, where its trial is failed as interrupted (not left running).
            with interrupts.deferred(then_raise=False):
                claimed = coordination.claim_trial(
                    session.store,
                    session.lock,
                    target=session.target,
                    session=session.run_id,
                    propose=lambda: session.engine.propose(session.store, session.run_id),
                    suggest=session.study.search_space.suggest,
                    resume=session.resumes,
                )
            if claimed.failed_stale:
                session.reconcile()
            if claimed.state is Claim.DONE:
                return False
            if claimed.state is Claim.WAIT:
                time.sleep(coordination.wait_seconds())
                continue
            tracker.tag_session({"searchlab.heartbeat": str(time.time())})
            # failed trials leave the budget's count as it was: each claimed trial its own index
            place = done + counts[TrialState.FAILED]
            result = run_one(session, claimed, spec, listener, base_tags, Path(tmp), place, train)
            counts[result.state] += 1
            settled = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] > 0
            early = fail_fast(early, result, settled)
            streak = failure_streak(streak, result, options.max_failures)
            if options.recycle_mb is not None:
                rss = coordination.rss_mb()
                baseline = rss if baseline is None else baseline
                if rss - baseline > options.recycle_mb:
                    log.info("worker grew %.0f MB since its first trial: recycling", rss - baseline)
                    return True


def _first_line(error: str | None) -> str:
    return (error or "").strip().splitlines()[0] if (error or "").strip() else ""


def fail_fast(
    previous: TrialResult | None, result: TrialResult, settled: bool
) -> TrialResult | None:
    """Stop a session whose first trials fail alike before their first epoch (at build or
    on the first step: same exception, same message) at the second one, with the likely
    fix, instead of spending ``--max-failures`` trials on a mistake in the study.  Returns
    the failure the next trial is compared with; ``settled``: a trial of this session
    finished, so failures are the configurations', not the study's."""
    if settled or result.state is not TrialState.FAILED or not result.early:
        return None
    if previous is None or _first_line(previous.error) != _first_line(result.error):
        return result
    fix = result.hint or previous.hint
    raise SearchlabError(
        f"Stopped: trials {previous.number} and {result.number} failed the same way before "
        f"their first epoch ({_first_line(result.error)[:300]}); "
        + (
            f"likely fix: {fix}."
            if fix
            else "it is the study, not the parameters: fix it (the error is on their MLflow "
            "runs, tag searchlab.error)."
        )
        + " Finished trials are kept."
    )


def failure_streak(streak: int, result: TrialResult, max_failures: int) -> int:
    """Failed trials in a row after ``result``; stops the study once that reaches
    ``max_failures`` (``--max-failures``)."""
    if result.state is not TrialState.FAILED:
        return 0
    if result.tags.get("searchlab.oom"):  # too big for memory: the parameters', not the study's
        return streak
    streak += 1
    if streak >= max_failures:
        raise SearchlabError(
            f"Stopped the study after {streak} failed trials in a row "
            f"(--max-failures {max_failures}); last error: "
            f"{(result.error or '').splitlines()[0]}. Fix the study (or raise "
            "--max-failures); finished trials are kept."
        )
    return streak


def run_one(
    session: Session,
    claimed: coordination.Claimed,
    spec: TrialSpec,
    listener: SearchListener,
    base_tags: Mapping[str, str],
    tmp: Path,
    done: int,
    train: TrainFn | None = None,
) -> TrialResult:
    """Run the claimed trial and record it once in MLflow, Optuna and the engine.

    A trial of a session that resumes (``Session.resumes``) keeps a checkpoint; a resumed
    one (``claimed.resumed``) opens its MLflow run again and goes on from it.  Interrupted
    (Ctrl-C, SIGTERM) once it has a checkpoint, it is paused, not failed (module doc)."""
    import dataclasses

    from searchlab.tracking import trial_run_name
    from searchlab.training import run_trial

    trial, params, proposal = claimed.trial, claimed.params, claimed.proposal
    assert trial is not None and proposal is not None
    if proposal.epochs is not None:
        spec = dataclasses.replace(spec, epochs=proposal.epochs)
    number = trial.number
    heartbeat = coordination.Heartbeat(
        session.store.storage, trial._trial_id, coordination.heartbeat_interval()
    ).start()
    run_id: str | None = None
    folder: Path | None = None
    began: float | None = None
    try:
        tags = {
            **base_tags,
            "searchlab.input_shape": ",".join(map(str, spec.data.input_shape)),
            "searchlab.num_classes": classes_tag(spec.data.num_classes),
            **(
                {"searchlab.class_names": class_names_json(spec.data.class_names)}
                if spec.data.class_names is not None
                else {}
            ),
            **proposal.tags,
        }
        logged = 0  # epochs the trial's MLflow run already has (a resumed trial's)
        try:
            listener.trial_started(number, done + 1, session.target, params)
            interrupts.check()  # one that arrived during the claim: this trial owns it
            with interrupts.deferred():  # the run and the trial are linked, or neither exists
                if claimed.resumed:
                    try:
                        run_id, folder, logged = _resume_run(session, trial)
                    except Exception as exc:  # its run is gone, the store refused: this trial
                        return _not_resumed(session, claimed, listener, exc)
                else:
                    run_id = session.tracker.start_trial(
                        number, params, tags, run_name=trial_run_name(number, done + 1)
                    )
                    attrs = {RUN_ID_ATTR: run_id, **proposal.attrs}
                    if session.resumes:
                        folder = checkpoint_root() / run_id
                        attrs[coordination.CHECKPOINT_ATTR] = str(folder)
                    for name, value in attrs.items():
                        trial.set_user_attr(name, value)
            if not claimed.resumed:
                session.tracker.log_inputs(run_id, data_inputs(session.study, spec.data))
            if folder is not None:
                spec = dataclasses.replace(spec, checkpoint=folder)
            on_epoch = _epoch_callback(session, trial, proposal, spec, run_id, listener, logged)
            began = time.perf_counter()  # this process's part of the trial (ACTIVE_ATTR)
            result = (train or run_trial)(number, params, spec, tmp / f"trial-{number}", on_epoch)
            if claimed.resumed:  # its time before the pause counts, the pause does not
                result.duration += active_before(trial)
                trial.set_user_attr(ACTIVE_ATTR, round(result.duration, 3))
        except BaseException as exc:  # Ctrl-C, a study-level or store error: close, then stop
            if isinstance(exc, KeyboardInterrupt):
                interrupts.acknowledge()
                if run_id is not None and folder is not None and checkpoint.exists(folder):
                    with interrupts.deferred():
                        _pause(session, trial, run_id, folder, began)
                    raise
                error = "interrupted (Ctrl-C)"
            else:
                error = str(exc) or type(exc).__name__
            result = TrialResult(number, params, TrialState.FAILED, error=error)
            with interrupts.deferred():
                try:
                    finish(session, trial, run_id, result)
                    session.engine.tell(proposal, result)
                except Exception as inner:  # the stores may be what failed: say the first error
                    log.warning(
                        "trial %s: could not record its failure: %s",
                        number,
                        _why(inner),
                    )
                    _fail_run(session, number, run_id, error)
                checkpoint.remove(folder)
            raise
        with interrupts.deferred():  # MLflow, Optuna and the engine all learn the result
            try:
                finish(session, trial, run_id, result)
            except Exception as exc:  # a store failed (a full disk): no result in either
                _fail_run(session, number, run_id, f"its result was not recorded: {_why(exc)}")
                raise
            session.engine.tell(proposal, result)
            checkpoint.remove(folder)  # recorded: nothing to go on from
        note_cache(session, result)
    finally:
        heartbeat.stop()
    best = session.store.best()
    listener.trial_finished(result, _best_dict(best))
    return result


def checkpoint_root() -> Path:
    """Where trials keep their checkpoints: the project's working folder, on local disk."""
    return config.home() / "checkpoints"


def _resume_run(session: Session, trial: Any) -> tuple[str, Path, int]:
    """A resumed trial's MLflow run (open again), its checkpoint folder, and the epochs the
    run already logged."""
    attrs = trial.storage.get_trial(trial._trial_id).user_attrs
    run_id, folder = str(attrs[RUN_ID_ATTR]), Path(attrs[coordination.CHECKPOINT_ATTR])
    logged = session.tracker.resume_trial(
        run_id,
        {
            "searchlab.resumed_in": session.run_id,
            "searchlab.resumes": str(attrs.get(coordination.RESUMES_ATTR, 1)),
        },
    )
    return run_id, folder, logged


def _not_resumed(
    session: Session, claimed: coordination.Claimed, listener: SearchListener, exc: Exception
) -> TrialResult:
    """Fail a trial taken over whose MLflow run could not be opened again; the study goes
    on (the next session's reconcile closes the run if it is still open)."""
    trial, proposal = claimed.trial, claimed.proposal
    assert trial is not None and proposal is not None
    error = f"cannot resume: its MLflow run could not be opened again ({exc})"
    log.warning("trial %s: %s", trial.number, error)
    result = TrialResult(trial.number, claimed.params, TrialState.FAILED, error=error)
    result.tags["searchlab.resume_error"] = str(exc)[:500]
    finish(session, trial, None, result)
    session.engine.tell(proposal, result)
    folder = trial.storage.get_trial(trial._trial_id).user_attrs.get(coordination.CHECKPOINT_ATTR)
    checkpoint.remove(Path(folder) if folder else None)
    listener.trial_finished(result, _best_dict(session.store.best()))
    return result


def _fail_run(session: Session, number: int, run_id: str | None, error: str) -> None:
    """End a trial's MLflow run FAILED when Optuna could not record how the trial ended
    (its store failed), where MLflow still can: the run shows no result Optuna lacks."""
    if run_id is None:
        return
    try:
        session.tracker.fail_trial(run_id, error)
    except Exception as exc:  # both stores are gone: the next run's reconcile closes it
        log.warning("trial %s: could not close its MLflow run: %s", number, _why(exc))


def _why(exc: BaseException) -> str:
    """An error and what it came from (SQLAlchemy's words under Optuna's), one line each
    joined: "An exception is raised during the commit ...; (sqlite3.OperationalError)
    database or disk is full"."""
    from searchlab.errors import chain

    lines = [_first_line(str(e)) for e in chain(exc)]
    return "; ".join(dict.fromkeys(line for line in lines if line))[:1000]


def active_before(trial: Any) -> float:
    """The seconds a resumed trial trained before this process took it over (``ACTIVE_ATTR``)."""
    attrs = trial.storage.get_trial(trial._trial_id).user_attrs
    return float(attrs.get(ACTIVE_ATTR, 0.0))


def _pause(session: Session, trial: Any, run_id: str, folder: Path, began: float | None) -> None:
    """End an interrupted trial's run KILLED and leave its Optuna trial RUNNING with its
    checkpoint, for the next session to go on with (``coordination``: resumable trials);
    the time it trained so far (since ``began``, a ``perf_counter`` time, and before) is kept
    on it (``ACTIVE_ATTR``)."""
    number = trial.number
    try:
        if began is not None:
            active = active_before(trial) + time.perf_counter() - began
            trial.set_user_attr(ACTIVE_ATTR, round(active, 3))
    except Exception as exc:  # the store may be what stopped the run: the pause comes first
        log.warning("trial %s: could not record its training time: %s", number, exc)
    try:
        state = checkpoint.load(folder)
        epoch = state.epoch if state is not None else 0
    except checkpoint.CheckpointError:
        epoch = 0
    note = f"interrupted after epoch {epoch}: the next searchlab run goes on from there"
    log.warning("trial %s: %s", number, note)
    try:
        session.tracker.pause_trial(run_id, note)
    except Exception as exc:  # the next session's reconcile closes it
        log.warning("trial %s: could not close its MLflow run: %s", number, exc)


def note_cache(session: Session, result: TrialResult) -> None:
    """Say once per session why its trials train without the feature cache: one log line and
    the session run's tags ``searchlab.cache=off`` and ``searchlab.cache.reason``, from the
    first trial whose run has that reason (``outcome.CACHE_REASON_TAG``).  A warning, unless
    the study turned the cache off or its model freezes nothing, or this process is a worker
    other than the first of several (their lines reach the same console: one says it)."""
    from searchlab.outcome import CACHE_REASON_TAG, cache_off_by_choice

    reason = result.tags.get(CACHE_REASON_TAG)
    if not reason or session.cache_reason is not None:
        return
    session.cache_reason = reason
    worker = session.options.worker
    sibling = worker is not None and not worker.startswith("1/")
    log.log(
        logging.INFO if cache_off_by_choice(reason) or sibling else logging.WARNING,
        "study %s: the feature cache is off: %s",
        session.study.name,
        reason,
    )
    try:
        session.tracker.tag_session({"searchlab.cache": "off", CACHE_REASON_TAG: reason})
    except Exception as exc:  # the trial is recorded; a missing session tag must not stop it
        log.warning("could not tag the session with the cache's state: %s", exc)


def _best_dict(best: StoredTrial | None) -> dict[str, Any] | None:
    return {"number": best.number, "value": best.value, "params": best.params} if best else None


def _epoch_callback(
    session: Session,
    trial: Any,
    proposal: Any,
    spec: TrialSpec,
    run_id: str,
    listener: SearchListener | None = None,
    logged: int = 0,
) -> Callable[[int, dict[str, float]], None]:
    """``on_epoch(index, logs)`` for ``trial.run_trial`` (``index``: Keras's, from 0): log the
    epoch in MLflow, tell the listener, report the objective to Optuna and to the engine,
    which may prune the trial.

    Epochs are numbered from 1 wherever a user sees them: epoch ``k`` is the ``k``-th, after
    which ``k`` epochs are trained: the MLflow step, Optuna's step (as its pruners expect),
    the console, ``best_epoch`` and ``searchlab.pruned_epoch``.

    A resumed trial reports its checkpoint's epoch again (``trial._Checkpointer``): an epoch
    up to ``logged`` (what its MLflow run has) is not logged again, nor one Optuna has
    reported to it again; the pruner is asked again."""
    number = trial.number
    reported = (
        set(trial.storage.get_trial(trial._trial_id).intermediate_values) if logged else set()
    )
    # a listener written before SearchListener had epoch() still works: it is not told
    tell = getattr(listener, "epoch", None)

    def on_epoch(index: int, logs: dict[str, float]) -> None:
        epoch = index + 1
        if epoch > logged:
            session.tracker.log_epoch(run_id, epoch, logs)
        if tell is not None:
            tell(number, epoch, spec.epochs, logs)
        value = logs.get(spec.objective)
        if value is None or not math.isfinite(value):
            return
        if epoch not in reported:
            trial.report(value, epoch)
        if session.engine.report(trial, proposal, index, logs, epoch >= spec.epochs):
            raise TrialPruned(epoch)

    return on_epoch


def finish(session: Session, trial: Any, run_id: str | None, result: TrialResult) -> None:
    """MLflow first, then Optuna: a crash in between leaves Optuna RUNNING (it is failed as
    stale on resume), never a COMPLETE Optuna trial without its MLflow weights."""
    store = session.store
    try:
        store.annotate(trial, result)
        if run_id is not None:
            session.tracker.end_trial(run_id, result)
    except Exception:
        store.tell(trial, TrialState.FAILED)
        raise
    store.tell(trial, result.state, result.value)


__all__ = [
    "Session",
    "close_session",
    "end_session",
    "fail_fast",
    "open_shared",
    "session_counts",
    "failure_streak",
    "note_cache",
    "open_session",
    "prepare",
    "data_inputs",
    "result_settings",
    "run",
    "session_info",
    "trial_spec",
    "trial_tags",
    "work",
]
