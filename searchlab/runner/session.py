"""One session on a study, and its lifecycle: open, work, re-evaluate, close.

``Session.open`` opens the stores and the parent run; ``Session.lifecycle`` then runs the
search it is handed (``Session.work`` in this process, or the launcher's worker processes),
re-evaluates (``--reeval-top``) and closes (``Session.end``: the summary, the trials table
and the best model on the parent run).  ``runner.run`` and ``workers.run`` both go through it,
so the order of those steps, what a Ctrl-C does to them and what is closed when one fails
are written once, here."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab import checkpoint, config, coordination, interrupts
from searchlab.outcome import TrialResult, TrialState
from searchlab.runner import artifacts, trials
from searchlab.runner.setup import TrainFn, session_info, trial_tags
from searchlab.store import StudyStore, redact

if TYPE_CHECKING:
    from searchlab.engines import Engine, RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import RunRecord, Tracker
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)
#: Optuna study user attr (with the key appended): ``{"run_id", "closed"}`` of a shared session
SHARED_ATTR = "searchlab.shared_session."


def no_counts() -> dict[TrialState, int]:
    """A session's trials by how they ended, before any has."""
    return {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAILED: 0}


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

    # ------------------------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
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
        training, and a run that fails here writes nothing: the Optuna storage is opened
        first (a bad ``--storage`` fails before MLflow is touched), and what it created is
        discarded when the MLflow store then fails.  A new session also closes what a crashed
        one left open.  ``settings`` (``result_settings``) are logged on the parent run."""
        store = _open_store(study, options, tracker, engine, settings)
        try:
            lock = coordination.StudyLock(
                storage=store.storage,
                storage_url=options.storage,
                study_name=study.name,
                lock_dir=config.home(),
            )
            info = session_info(study, options, target, engine, data_source, settings)
            if store.changed_settings:  # --allow-changed-settings: it says what it changed
                from searchlab.store import describe_changes

                info["changed_settings"] = describe_changes(store.changed_settings)
            session = cls(study, options, engine, tracker, store, lock, target, info)
            session._start()
        except BaseException:
            engine.close()
            raise
        return session

    def _start(self) -> None:
        """Attach to the launcher's parent run, or start (or join) this session's own and,
        when this process started it, reconcile and link it."""
        options, tracker = self.options, self.tracker
        if options.parent_run_id:
            tracker.attach(options.parent_run_id)
            return
        with interrupts.deferred():  # a parent run is never left open without its links
            if options.session_key:
                if not self.open_shared(options.session_key):
                    return  # joined: the process that started the shared session linked it
            else:
                tracker.start_session(self.study.name, self.info)
            try:
                self.reconcile()
                self.link()
            except BaseException:
                tracker.end_session({}, "FAILED")
                raise

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

    # A shared session: ``searchlab run --session KEY`` (``$SEARCHLAB_SESSION``) on several
    # machines -- a SLURM job array, a Kubernetes Job with ``parallelism: N`` -- runs one
    # session: one MLflow parent run for every process that names the same key.  Under the
    # study lock the first one starts the parent run and records it in the Optuna study (user
    # attr ``SHARED_ATTR + KEY``); the others attach to it.  Each runs trials until the budget
    # is met; then, under the lock again, the process that sees no trial still running is
    # the last: it marks the session closed and closes it as a single process would (trials
    # table, best model, summary).  The others leave the parent run open.  A process that
    # comes after the close has nothing to do (``SessionOver``).

    def open_shared(self, key: str) -> bool:
        """Start the shared session ``key``'s parent run, or attach to it; True when this
        process started it.  Raises ``SessionOver`` when its last process has closed it."""
        from searchlab.errors import SessionOver

        tracker, store = self.tracker, self.store
        with self.lock.held():
            known = store.attr(SHARED_ATTR + key)
            status = tracker.run_status(known["run_id"]) if known else None
            if known and not known.get("closed") and status == "RUNNING":
                tracker.attach(known["run_id"])
                return False
            if known and not known.get("closed"):
                raise SessionOver(
                    f"Session {key!r} of study {self.study.name!r} was not closed by "
                    f"searchlab: its parent run {known['run_id']} is "
                    f"{status or 'gone from the tracking store'} (its process died?). Use "
                    "another --session key to continue the study."
                )
            if known:
                raise SessionOver(
                    f"Session {key!r} of study {self.study.name!r} is over (its last process "
                    "closed it); nothing left to do. Use another --session key to continue "
                    "the study."
                )
            tracker.start_session(self.study.name, {**self.info, "session_key": key})
            store.set_attr(SHARED_ATTR + key, {"run_id": self.run_id, "closed": False})
        return True

    def link(self) -> None:
        """Tag a new parent run with its process, a liveness heartbeat, and the study it
        continues (Optuna study id, trials finished before it, the previous session's run);
        record the session on the Optuna study."""
        tracker, store = self.tracker, self.store
        previous = tracker.previous_session(self.study.name)
        started = coordination.process_start()
        tracker.tag_session(
            {
                "searchlab.host": coordination.hostname(),
                "searchlab.pid": str(os.getpid()),
                **({coordination.START_ATTR: started} if started else {}),
                "searchlab.heartbeat": str(time.time()),
                "searchlab.optuna_study_id": str(store.study_id),
                "searchlab.resumed_with": str(self.finished_count()),
                **({"searchlab.previous_session": previous} if previous else {}),
            }
        )
        store.set_attr(
            f"searchlab.session.{self.run_id}",
            {
                "host": coordination.hostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "tracking_uri": redact(tracker.uri),
            },
        )

    # ------------------------------------------------------------------- the lifecycle

    def lifecycle(
        self,
        listener: SearchListener,
        search: Callable[[], object],
        *,
        spec: Callable[[], TrialSpec],
        counts: Callable[[], Mapping[TrialState, int]],
        stop: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """The open session's work, re-evaluation and close; returns the summary.

        ``search()`` runs the trials (``Session.work``, or the launcher's workers); ``spec()``
        is the trials' spec for ``--reeval-top`` and the best model; ``counts()`` the
        session's trials by state for the summary; ``stop()`` ends what ``search`` left
        running (the launcher's workers) before the close.  A Ctrl-C ends the session KILLED,
        an error FAILED; either way the parent run is closed and the engine too."""
        status = "FAILED"
        try:
            listener.started(self.study.name, self.finished_count(), self.target, self.info)
            search()
            if self.options.reeval_top:
                self.reevaluate(spec())
            status = "FINISHED"
        except KeyboardInterrupt:
            interrupts.acknowledge()  # closing the session below is not cut short by it
            status = "KILLED"
            raise
        finally:
            summary = self._conclude(status, spec, counts, stop)
            listener.finished(summary)
        return summary

    def _conclude(
        self,
        status: str,
        spec: Callable[[], TrialSpec],
        counts: Callable[[], Mapping[TrialState, int]],
        stop: Callable[[], None] | None,
    ) -> dict[str, Any]:
        """``lifecycle``'s last step, whole (``interrupts.deferred``): ``stop``, the counts,
        ``end``, ``Engine.close``."""
        with interrupts.deferred():
            if stop is not None:
                stop()
            tallies: Mapping[TrialState, int] = no_counts()
            final: TrialSpec | None = None
            try:
                tallies = counts()
                if status == "FINISHED":
                    final = spec()  # for the best model on the parent run
            finally:
                try:
                    summary = self.end(status, tallies, final)
                finally:
                    self.engine.close()
        return summary

    def work(
        self,
        spec: TrialSpec,
        listener: SearchListener,
        counts: dict[TrialState, int],
        train: TrainFn | None = None,
    ) -> bool:
        """Claim and run trials until the budget or the time limit is met (``trials.work``);
        True when this process stopped early to shed memory (``--recycle-mb``)."""
        return trials.work(self, spec, listener, counts, train)

    def work_for_launcher(
        self, spec: TrialSpec, listener: SearchListener, train: TrainFn | None
    ) -> dict[str, Any]:
        """A worker's part of its launcher's session: its trials; the parent run is left to
        the launcher.  The summary has ``recycle``: True when it stopped to shed memory."""
        counts = no_counts()
        try:
            recycle = self.work(spec, listener, counts, train)
        except KeyboardInterrupt:
            interrupts.acknowledge()
            raise
        finally:
            with interrupts.deferred():
                self.tracker.close_all("FAILED")  # only this worker's own trial runs are open
        return {**self.summarize(counts), "recycle": recycle}

    def reevaluate(self, spec: TrialSpec) -> None:
        """``--reeval-top``: re-train the best configurations with other seeds."""
        from searchlab import reeval

        options = self.options
        with tempfile.TemporaryDirectory(prefix="searchlab-reeval-") as tmp:
            reeval.reevaluate(
                self.store,
                spec,
                self.tracker,
                trial_tags(self.study, options, self.engine.name),
                options.reeval_top,
                options.reeval_seeds,
                Path(tmp),
            )

    def note_cache(self, result: TrialResult) -> None:
        """Say once per session why its trials train without the feature cache: one log line
        and the session run's tags ``searchlab.cache=off`` and ``searchlab.cache.reason``,
        from the first trial whose run has that reason (``outcome.CACHE_REASON_TAG``).  A
        warning, unless the study turned the cache off or its model freezes nothing, or this
        process is a worker other than the first of several (their lines reach the same
        console: one says it)."""
        from searchlab.outcome import CACHE_REASON_TAG, cache_off_by_choice

        reason = result.tags.get(CACHE_REASON_TAG)
        if not reason or self.cache_reason is not None:
            return
        self.cache_reason = reason
        worker = self.options.worker
        sibling = worker is not None and not worker.startswith("1/")
        log.log(
            logging.INFO if cache_off_by_choice(reason) or sibling else logging.WARNING,
            "study %s: the feature cache is off: %s",
            self.study.name,
            reason,
        )
        try:
            self.tracker.tag_session({"searchlab.cache": "off", CACHE_REASON_TAG: reason})
        except Exception as exc:  # the trial is recorded; a missing session tag must not stop it
            log.warning("could not tag the session with the cache's state: %s", exc)

    # ----------------------------------------------------------------------------- close

    def end(
        self, status: str, counts: Mapping[TrialState, int], spec: TrialSpec | None
    ) -> dict[str, Any]:
        """End this process's part of the session: ``close`` for a session of its own; for a
        shared one, close it only if this process is the last (the summary then counts every
        process's trials), else leave the parent run to the others."""
        key = self.options.session_key
        if not key:
            return self.close(status, counts, spec)
        last = False
        if status == "FINISHED":
            with self.lock.held():
                known = self.store.attr(SHARED_ATTR + key) or {}
                running = self.store.count(TrialState.RUNNING)
                if known.get("run_id") == self.run_id and not known.get("closed") and not running:
                    self.store.set_attr(SHARED_ATTR + key, {**known, "closed": True})
                    last = True
        if last:
            self.tracker.attach(self.run_id, own=True)
            return self.close(status, self.counts(), spec)
        self.tracker.leave()
        return {**self.summarize(counts), "shared_session": key, "left_open": True}

    def counts(self) -> dict[TrialState, int]:
        """The trials the session ended, by state, whichever process ran them."""
        counts = no_counts()
        for t in self.store.trials(*counts):
            if t.attrs.get(coordination.SESSION_ATTR) == self.run_id:
                counts[t.state] += 1
        return counts

    def summarize(self, counts: Mapping[TrialState, int]) -> dict[str, Any]:
        """The session summary: the study's counts, this session's, the best trial and,
        after re-evaluation, the configuration it selected."""
        from searchlab import reeval

        best = self.store.best()
        return {
            **self.store.counts(),
            "session_complete": counts[TrialState.COMPLETE],
            "session_pruned": counts[TrialState.PRUNED],
            "session_failed": counts[TrialState.FAILED],
            "session_seconds": time.monotonic() - self.started,
            "best_value": best.value if best else None,
            "best_trial": best.number if best else None,
            "best_params": dict(best.params) if best else {},
            "best_run_id": best.run_id if best else None,
            **reeval.summary(self.store),
        }

    def close(
        self, status: str, counts: Mapping[TrialState, int], spec: TrialSpec | None
    ) -> dict[str, Any]:
        """Reconcile, write the summary and artifacts on the parent run, and close it.

        A signal does not cut this short (``interrupts.deferred``): an interrupt that arrives
        meanwhile is raised once the parent run is closed."""
        with interrupts.deferred():
            summary: dict[str, Any] = {}
            try:
                summary = self.summarize(counts)
                try:
                    self.reconcile()
                except Exception as exc:  # the stores may be what failed; closing comes first
                    log.warning("could not reconcile MLflow with Optuna: %s", exc)
                if status == "FINISHED" and spec is not None:
                    self.log_artifacts(spec, summary)
            finally:
                self.tracker.end_session(summary, status)
        return summary

    def log_artifacts(self, spec: TrialSpec, summary: dict[str, Any]) -> None:
        """The trials table and the best model on the parent run (``artifacts``); adds
        ``model_uri`` (and ``registered``) to ``summary``."""
        artifacts.log_study_artifacts(
            self.study, self.store, self.tracker, self.options.register, spec, summary
        )


def _open_store(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    engine: Engine,
    settings: Mapping[str, str] | None,
) -> StudyStore:
    """The Optuna study opened, then MLflow connected (what the first created is discarded
    when the second fails), then the engine opened on it."""
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
    return store


__all__ = ["SHARED_ATTR", "Session", "no_counts"]
