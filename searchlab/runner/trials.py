"""A session's trials: ``work`` claims them one after the other, ``TrialRun`` runs one and
records it exactly once (MLflow first, then Optuna, then the engine), and ``fail_fast`` and
``failure_streak`` stop a study whose trials keep failing."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab import checkpoint, config, coordination, interrupts
from searchlab.data import class_names_json, classes_tag
from searchlab.errors import SearchlabError, TrialPruned
from searchlab.outcome import Claim, TrialResult, TrialState
from searchlab.runner.setup import TrainFn, data_inputs, trial_tags
from searchlab.store import ACTIVE_ATTR, RUN_ID_ATTR, StoredTrial

if TYPE_CHECKING:
    from searchlab.engines import SearchListener
    from searchlab.runner.session import Session
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)


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
    baseline: list[float] = []  # this process's memory after its first trial
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
            claimed = _claim(session)
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
            run = TrialRun(session, claimed, spec, listener, base_tags, Path(tmp), place, train)
            result = run.run()
            counts[result.state] += 1
            settled = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] > 0
            early = fail_fast(early, result, settled)
            streak = failure_streak(streak, result, options.max_failures)
            if _grown(options.recycle_mb, baseline):
                return True


def _claim(session: Session) -> coordination.Claimed:
    """The next trial, claimed whole or not at all; an interrupt meanwhile is raised by the
    trial's first check, where its trial is failed as interrupted (not left running)."""
    with interrupts.deferred(then_raise=False):
        return coordination.claim_trial(
            session.store,
            session.lock,
            target=session.target,
            session=session.run_id,
            propose=lambda: session.engine.propose(session.store, session.run_id),
            suggest=session.study.search_space.suggest,
            resume=session.resumes,
        )


def _grown(recycle_mb: float | None, baseline: list[float]) -> bool:
    """Whether this process grew by more than ``recycle_mb`` since its first trial (whose
    memory ``baseline`` keeps): time for a worker to recycle itself."""
    if recycle_mb is None:
        return False
    rss = coordination.rss_mb()
    if not baseline:
        baseline.append(rss)
    if rss - baseline[0] > recycle_mb:
        log.info("worker grew %.0f MB since its first trial: recycling", rss - baseline[0])
        return True
    return False


class TrialRun:
    """One claimed trial, run and recorded once in MLflow, Optuna and the engine.

    A trial of a session that resumes (``Session.resumes``) keeps a checkpoint; a resumed
    one (``claimed.resumed``) opens its MLflow run again and goes on from it.  Interrupted
    (Ctrl-C, SIGTERM) once it has a checkpoint, it is paused, not failed (``runner``)."""

    def __init__(
        self,
        session: Session,
        claimed: coordination.Claimed,
        spec: TrialSpec,
        listener: SearchListener,
        base_tags: Mapping[str, str],
        tmp: Path,
        done: int,
        train: TrainFn | None = None,
    ) -> None:
        trial, proposal = claimed.trial, claimed.proposal
        assert trial is not None and proposal is not None
        self.session, self.claimed, self.listener = session, claimed, listener
        self.trial, self.params, self.proposal = trial, claimed.params, proposal
        self.number: int = trial.number
        self.spec = (
            spec if proposal.epochs is None else dataclasses.replace(spec, epochs=proposal.epochs)
        )
        self.base_tags, self.tmp, self.done, self.train = base_tags, tmp, done, train
        self.run_id: str | None = None
        self.folder: Path | None = None  # its checkpoint folder
        self.began: float | None = None  # when this process began training it (perf_counter)
        self.logged = 0  # epochs the trial's MLflow run already has (a resumed trial's)

    def run(self) -> TrialResult:
        """Heartbeat, MLflow run, training, the record; the listener is told how it ended."""
        heartbeat = coordination.Heartbeat(
            self.session.store.storage, self.trial._trial_id, coordination.heartbeat_interval()
        ).start()
        try:
            tags = self._tags()
            try:
                self.listener.trial_started(
                    self.number, self.done + 1, self.session.target, self.params
                )
                interrupts.check()  # one that arrived during the claim: this trial owns it
                refused = self._link(tags)
                if refused is not None:
                    return refused
                result = self._train()
            except BaseException as exc:  # Ctrl-C, a study-level or store error: close, stop
                self._fail(exc)
                raise
            self._record(result)
            self.session.note_cache(result)
        finally:
            heartbeat.stop()
        self.listener.trial_finished(result, best_dict(self.session.store.best()))
        return result

    def _tags(self) -> dict[str, str]:
        data = self.spec.data
        return {
            **self.base_tags,
            "searchlab.input_shape": ",".join(map(str, data.input_shape)),
            "searchlab.num_classes": classes_tag(data.num_classes),
            **(
                {"searchlab.class_names": class_names_json(data.class_names)}
                if data.class_names is not None
                else {}
            ),
            **self.proposal.tags,
        }

    def _link(self, tags: dict[str, str]) -> TrialResult | None:
        """The trial's MLflow run, started or (a resumed trial) opened again, and linked to
        its Optuna trial, whole: the run and the trial are linked, or neither exists.  A
        resumed trial whose run cannot be opened again is failed: its result is returned."""
        from searchlab.tracking import trial_run_name

        session, trial = self.session, self.trial
        with interrupts.deferred():
            if self.claimed.resumed:
                try:
                    self.run_id, self.folder, self.logged = self._resume_run()
                except Exception as exc:  # its run is gone, the store refused: this trial
                    return self._not_resumed(exc)
                return None
            run_id = session.tracker.start_trial(
                self.number, self.params, tags, run_name=trial_run_name(self.number, self.done + 1)
            )
            self.run_id = run_id
            attrs = {RUN_ID_ATTR: run_id, **self.proposal.attrs}
            if session.resumes:
                self.folder = checkpoint_root() / run_id
                attrs[coordination.CHECKPOINT_ATTR] = str(self.folder)
            for name, value in attrs.items():
                trial.set_user_attr(name, value)
        return None

    def _train(self) -> TrialResult:
        """Train the trial (``training.run_trial``, or the ``train`` a test gave)."""
        from searchlab.training import run_trial

        session, spec, run_id = self.session, self.spec, self.run_id
        assert run_id is not None
        if not self.claimed.resumed:
            session.tracker.log_inputs(run_id, data_inputs(session.study, spec.data))
        if self.folder is not None:
            spec = dataclasses.replace(spec, checkpoint=self.folder)
        on_epoch = self._epoch_callback(spec, run_id)
        self.began = time.perf_counter()  # this process's part of the trial (ACTIVE_ATTR)
        train = self.train or run_trial
        result = train(self.number, self.params, spec, self.tmp / f"trial-{self.number}", on_epoch)
        if self.claimed.resumed:  # its time before the pause counts, the pause does not
            result.duration += active_before(self.trial)
            self.trial.set_user_attr(ACTIVE_ATTR, round(result.duration, 3))
        return result

    def _epoch_callback(
        self, spec: TrialSpec, run_id: str
    ) -> Callable[[int, dict[str, float]], None]:
        """``on_epoch(index, logs)`` for ``training.run_trial`` (``index``: Keras's, from 0):
        log the epoch in MLflow, tell the listener, report the objective to Optuna and to the
        engine, which may prune the trial.

        Epochs are numbered from 1 wherever a user sees them: epoch ``k`` is the ``k``-th,
        after which ``k`` epochs are trained: the MLflow step, Optuna's step (as its pruners
        expect), the console, ``best_epoch`` and ``searchlab.pruned_epoch``.

        A resumed trial reports its checkpoint's epoch again (``training.Checkpointer``): an
        epoch up to ``logged`` (what its MLflow run has) is not logged again, nor one Optuna
        has reported to it again; the pruner is asked again."""
        session, trial, proposal, logged = self.session, self.trial, self.proposal, self.logged
        number = self.number
        reported = (
            set(trial.storage.get_trial(trial._trial_id).intermediate_values) if logged else set()
        )
        # a listener written before SearchListener had epoch() still works: it is not told
        tell = getattr(self.listener, "epoch", None)

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

    def _fail(self, exc: BaseException) -> None:
        """The trial stopped by ``exc`` (the caller raises it again): paused when it was a
        Ctrl-C and the trial has a checkpoint, else recorded FAILED everywhere it can be."""
        run_id, folder = self.run_id, self.folder
        if isinstance(exc, KeyboardInterrupt):
            interrupts.acknowledge()
            if run_id is not None and folder is not None and checkpoint.exists(folder):
                with interrupts.deferred():
                    self._pause(run_id, folder)
                return
            error = "interrupted (Ctrl-C)"
        else:
            error = str(exc) or type(exc).__name__
        result = TrialResult(self.number, self.params, TrialState.FAILED, error=error)
        with interrupts.deferred():
            try:
                finish(self.session, self.trial, run_id, result)
                self.session.engine.tell(self.proposal, result)
            except Exception as inner:  # the stores may be what failed: say the first error
                log.warning("trial %s: could not record its failure: %s", self.number, why(inner))
                self._fail_run(error)
            checkpoint.remove(folder)

    def _record(self, result: TrialResult) -> None:
        """MLflow, Optuna and the engine all learn the result, whole; then the checkpoint
        folder goes (nothing to go on from)."""
        with interrupts.deferred():
            try:
                finish(self.session, self.trial, self.run_id, result)
            except Exception as exc:  # a store failed (a full disk): no result in either
                self._fail_run(f"its result was not recorded: {why(exc)}")
                raise
            self.session.engine.tell(self.proposal, result)
            checkpoint.remove(self.folder)

    def _resume_run(self) -> tuple[str, Path, int]:
        """A resumed trial's MLflow run (open again), its checkpoint folder, and the epochs
        the run already logged."""
        trial = self.trial
        attrs = trial.storage.get_trial(trial._trial_id).user_attrs
        run_id, folder = str(attrs[RUN_ID_ATTR]), Path(attrs[coordination.CHECKPOINT_ATTR])
        logged = self.session.tracker.resume_trial(
            run_id,
            {
                "searchlab.resumed_in": self.session.run_id,
                "searchlab.resumes": str(attrs.get(coordination.RESUMES_ATTR, 1)),
            },
        )
        return run_id, folder, logged

    def _not_resumed(self, exc: Exception) -> TrialResult:
        """Fail a trial taken over whose MLflow run could not be opened again; the study goes
        on (the next session's reconcile closes the run if it is still open)."""
        session, trial = self.session, self.trial
        error = f"cannot resume: its MLflow run could not be opened again ({exc})"
        log.warning("trial %s: %s", trial.number, error)
        result = TrialResult(trial.number, self.params, TrialState.FAILED, error=error)
        result.tags["searchlab.resume_error"] = str(exc)[:500]
        finish(session, trial, None, result)
        session.engine.tell(self.proposal, result)
        attrs = trial.storage.get_trial(trial._trial_id).user_attrs
        folder = attrs.get(coordination.CHECKPOINT_ATTR)
        checkpoint.remove(Path(folder) if folder else None)
        self.listener.trial_finished(result, best_dict(session.store.best()))
        return result

    def _fail_run(self, error: str) -> None:
        """End the trial's MLflow run FAILED when Optuna could not record how the trial ended
        (its store failed), where MLflow still can: the run shows no result Optuna lacks."""
        if self.run_id is None:
            return
        try:
            self.session.tracker.fail_trial(self.run_id, error)
        except Exception as exc:  # both stores are gone: the next run's reconcile closes it
            log.warning("trial %s: could not close its MLflow run: %s", self.number, why(exc))

    def _pause(self, run_id: str, folder: Path) -> None:
        """End an interrupted trial's run KILLED and leave its Optuna trial RUNNING with its
        checkpoint, for the next session to go on with (``coordination``: resumable trials);
        the time it trained so far (since ``began`` and before) is kept on it
        (``ACTIVE_ATTR``)."""
        trial, number = self.trial, self.number
        try:
            if self.began is not None:
                active = active_before(trial) + time.perf_counter() - self.began
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
            self.session.tracker.pause_trial(run_id, note)
        except Exception as exc:  # the next session's reconcile closes it
            log.warning("trial %s: could not close its MLflow run: %s", number, exc)


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


def checkpoint_root() -> Path:
    """Where trials keep their checkpoints: the project's working folder, on local disk."""
    return config.home() / "checkpoints"


def active_before(trial: Any) -> float:
    """The seconds a resumed trial trained before this process took it over (``ACTIVE_ATTR``)."""
    attrs = trial.storage.get_trial(trial._trial_id).user_attrs
    return float(attrs.get(ACTIVE_ATTR, 0.0))


def best_dict(best: StoredTrial | None) -> dict[str, Any] | None:
    return {"number": best.number, "value": best.value, "params": best.params} if best else None


def why(exc: BaseException) -> str:
    """An error and what it came from (SQLAlchemy's words under Optuna's), one line each
    joined: "An exception is raised during the commit ...; (sqlite3.OperationalError)
    database or disk is full"."""
    from searchlab.errors import chain

    lines = [first_line(str(e)) for e in chain(exc)]
    return "; ".join(dict.fromkeys(line for line in lines if line))[:1000]


def first_line(error: str | None) -> str:
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
    if previous is None or first_line(previous.error) != first_line(result.error):
        return result
    fix = result.hint or previous.hint
    raise SearchlabError(
        f"Stopped: trials {previous.number} and {result.number} failed the same way before "
        f"their first epoch ({first_line(result.error)[:300]}); "
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
