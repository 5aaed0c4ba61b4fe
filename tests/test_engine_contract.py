"""The engine contract (``engines.Engine``), run against every engine through the runner.

Trials here train nothing: ``train`` stands in for ``trial.run_trial`` and reports made-up
epochs, so these tests check the session loop itself in seconds: the budget, one ``tell``
per proposal, each grid point once, resume, failure streaks, Ctrl-C, pruning and the order
of the tracker's and the listener's calls.  The tracker is ``MemoryTracker``; the Optuna
storage is a real SQLite file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from searchlab import engines, runner
from searchlab.errors import SearchlabError, TrialPruned
from searchlab.outcome import TrialResult, TrialState
from searchlab.space import Choice, Int
from searchlab.store import StudyStore
from searchlab.study import Study
from searchlab.tracking import MemoryTracker

ENGINES = list(engines.ENGINES)
GRID_SIZE = 6  # a in 1..3, b in x|y


def tiny_data() -> tuple:
    rng = np.random.default_rng(0)
    return (rng.random((20, 4)), rng.integers(0, 2, 20)), (
        rng.random((10, 4)),
        rng.integers(0, 2, 10),
    )


def make_study(strategy: str = "random", trials: int | None = 4) -> Study:
    from searchlab import Dataset

    return Study(
        name="contract",
        space={"a": Int(1, 3), "b": Choice(["x", "y"])},
        model=lambda params: None,
        data=Dataset(loader=tiny_data),
        objective="val_accuracy",
        direction="maximize",
        strategy=strategy,
        trials=trials,
        epochs=3,
        seed=0,
    )


def options(tmp_path: Path, engine: str, study: Study, **kw: Any) -> engines.RunOptions:
    values: dict[str, Any] = {
        "strategy": study.strategy,
        "trials": study.trials,
        "timeout": None,
        "epochs": study.epochs,
        "seed": 0,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "engine": engine,
    }
    values.update(kw)
    return engines.RunOptions(**values)


def score(params: dict[str, Any]) -> float:
    return params["a"] / 10 + (0.05 if params["b"] == "x" else 0.0)


class FakeTrainer:
    """``trial.run_trial``'s stand-in: every epoch reports ``val_accuracy`` rising to
    ``score(params)``; ``fail`` and ``interrupt`` pick trial numbers that go wrong."""

    def __init__(
        self,
        fail: set[int] | None = None,
        interrupt: int | None = None,
        early: dict[int, str] | None = None,
    ) -> None:
        self.calls: list[tuple[int, dict[str, Any], int]] = []
        self.fail = fail or set()
        self.interrupt = interrupt
        #: trial number -> the error of a failure before the first epoch (at build)
        self.early = early or {}

    def __call__(self, number, params, spec, workdir, on_epoch) -> TrialResult:
        self.calls.append((number, dict(params), spec.epochs))
        if number == self.interrupt:
            raise KeyboardInterrupt
        if number in self.fail:
            return TrialResult(number, dict(params), TrialState.FAILED, error="boom: bad config")
        if number in self.early:
            return TrialResult(
                number,
                dict(params),
                TrialState.FAILED,
                error=f"{self.early[number]}\nTraceback ...",
                early=True,
                hint="use the right loss" if "rank" in self.early[number] else None,
            )
        history: dict[str, list[float]] = {}
        for epoch in range(spec.epochs):
            logs = {
                "loss": 1.0 - score(params),
                "val_accuracy": score(params) * (epoch + 1) / spec.epochs,
            }
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            try:
                on_epoch(epoch, logs)
            except TrialPruned as exc:
                return TrialResult(
                    number, dict(params), TrialState.PRUNED, history=history, error=str(exc)
                )
        return TrialResult(
            number,
            dict(params),
            TrialState.COMPLETE,
            value=history["val_accuracy"][-1],
            best_epoch=spec.epochs,  # numbered from 1
            history=history,
        )


class Recorder:
    """A ``SearchListener`` that records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def started(self, name, done, total, info) -> None:
        self.calls.append("started")

    def trial_started(self, number, index, total, params) -> None:
        self.calls.append("trial_started")

    def epoch(self, number, epoch, epochs, logs) -> None:
        self.calls.append(f"epoch {epoch}/{epochs}")

    def trial_finished(self, result, best) -> None:
        self.calls.append(f"trial_finished:{result.state.value}")

    def finished(self, summary) -> None:
        self.calls.append("finished")


@pytest.fixture
def tells(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, TrialResult]]:
    """Every ``Engine.tell`` the runner makes, with its proposal."""
    told: list[tuple[Any, TrialResult]] = []
    create = engines.create

    def spying_create(study, opts):
        engine = create(study, opts)
        tell = engine.tell

        def spy(proposal, result):
            told.append((proposal, result))
            tell(proposal, result)

        engine.tell = spy
        return engine

    monkeypatch.setattr(engines, "create", spying_create)
    return told


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / "home"))  # keras-tuner's oracle files
    return tmp_path


@pytest.fixture(autouse=True)
def study_artifacts(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Fake trials save no weights, so the best model is not rebuilt at the end (the
    end-to-end tests do that); the summary it would use is recorded instead."""
    summaries: list[dict[str, Any]] = []
    monkeypatch.setattr(
        runner.Session,
        "log_artifacts",
        lambda session, spec, summary: summaries.append(dict(summary)),
    )
    return summaries


def stored(tmp_path: Path) -> StudyStore:
    return StudyStore.load("contract", f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", ["random", "grid"])
def test_the_budget_is_met_and_every_proposal_is_told_once(
    tmp_path, tells, study_artifacts, engine, strategy
):
    study = make_study(strategy, trials=4)
    tracker, trainer, listener = MemoryTracker(), FakeTrainer(), Recorder()
    summary = runner.run(study, options(tmp_path, engine, study), tracker, listener, train=trainer)

    store = stored(tmp_path)
    trials = store.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert summary["n_complete"] == 4 and summary["session_complete"] == 4
    assert len(tells) == len(trainer.calls) == 4
    assert [r.number for _, r in tells] == [t.number for t in trials]
    assert summary["best_value"] == max(t.value for t in trials)
    assert [s["best_run_id"] for s in study_artifacts] == [store.best().run_id]
    # MLflow: one finished run per trial, linked from Optuna, epochs logged in order
    runs = {r.run_id: r for r in tracker.runs("contract")}
    for t in trials:
        run = runs[t.run_id]
        assert run.status == "FINISHED" and run.tags["searchlab.trial"] == str(t.number)
        assert run.tags["searchlab.engine"] == engine
        events = [e for e in tracker.events if len(e) > 1 and e[1] == t.run_id]
        steps = [int(e[2]) for e in events if e[0] == "log_epoch"]
        assert steps == [1, 2, 3]  # epochs are numbered from 1, in MLflow as everywhere
        assert [e[0] for e in events] == [
            "start_trial",
            "log_inputs",  # the data it trains on, as train and validation
            "log_epoch",
            "log_epoch",
            "log_epoch",
            "end_trial",
        ]
    session = [r for r in runs.values() if r.tags.get("searchlab.role") == "session"]
    assert [s.status for s in session] == ["FINISHED"]
    assert listener.calls == [
        "started",
        *["trial_started", "epoch 1/3", "epoch 2/3", "epoch 3/3", "trial_finished:complete"] * 4,
        "finished",
    ]
    if strategy == "grid":
        points = [tuple(sorted(t.params.items())) for t in trials]
        assert len(set(points)) == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_a_grid_without_trials_runs_every_point_once(tmp_path, tells, engine):
    study = make_study("grid", trials=None)
    trainer = FakeTrainer()
    runner.run(study, options(tmp_path, engine, study), MemoryTracker(), train=trainer)
    points = Counter(tuple(sorted(p.items())) for _, p, _ in trainer.calls)
    assert len(points) == GRID_SIZE and set(points.values()) == {1}
    assert stored(tmp_path).finished_count() == GRID_SIZE
    assert len(tells) == GRID_SIZE


@pytest.mark.parametrize(
    ("engine", "strategy"),
    [("optuna", "grid"), ("optuna", "random"), ("keras-tuner", "random"), ("keras-tuner", "grid")],
)
def test_a_second_session_continues_the_study(tmp_path, tells, engine, strategy):
    study = make_study(strategy, trials=2)
    first = FakeTrainer()
    runner.run(study, options(tmp_path, engine, study), MemoryTracker(), train=first)
    again = FakeTrainer()
    runner.run(study, options(tmp_path, engine, study, trials=5), MemoryTracker(), train=again)
    assert len(first.calls) == 2 and len(again.calls) == 3  # nothing finished runs again
    assert stored(tmp_path).finished_count() == 5
    assert len(tells) == 5
    if strategy == "grid":
        done = [tuple(sorted(p.items())) for _, p, _ in first.calls + again.calls]
        assert len(set(done)) == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_failures_in_a_row_stop_the_study_and_close_everything(tmp_path, tells, engine):
    study = make_study("random", trials=6)
    tracker = MemoryTracker()
    trainer = FakeTrainer(fail={1, 2, 3})
    opts = options(tmp_path, engine, study, max_failures=3)
    with pytest.raises(SearchlabError, match="after 3 failed trials in a row.*boom: bad config"):
        runner.run(study, opts, tracker, train=trainer)
    states = [t.state for t in stored(tmp_path).trials()]
    assert states == [TrialState.COMPLETE, *[TrialState.FAILED] * 3]
    assert [r.state for _, r in tells] == states
    assert {r.status for r in tracker.runs("contract")} == {"FINISHED", "FAILED"}
    assert tracker.records[tracker.session_id]["status"] == "FAILED"
    assert stored(tmp_path).trial(1).error == "boom: bad config"


RANK = "ValueError: `target` and `output` must have the same rank"


@pytest.mark.parametrize("engine", ENGINES)
def test_the_first_trials_failing_alike_before_an_epoch_stop_at_the_second(tmp_path, tells, engine):
    study = make_study("random", trials=6)
    tracker = MemoryTracker()
    trainer = FakeTrainer(early={0: RANK, 1: RANK, 2: RANK})
    opts = options(tmp_path, engine, study, max_failures=5)
    with pytest.raises(SearchlabError) as info:
        runner.run(study, opts, tracker, train=trainer)
    assert str(info.value) == (
        f"Stopped: trials 0 and 1 failed the same way before their first epoch ({RANK}); "
        "likely fix: use the right loss. Finished trials are kept."
    )
    assert len(trainer.calls) == 2 and len(tells) == 2
    assert tracker.records[tracker.session_id]["status"] == "FAILED"


@pytest.mark.parametrize("engine", ENGINES)
def test_early_failures_that_differ_or_follow_a_success_go_to_max_failures(
    tmp_path, tells, engine, monkeypatch
):
    study = make_study("random", trials=6)
    opts = options(tmp_path, engine, study, max_failures=3)
    differ = FakeTrainer(early={0: RANK, 1: "MemoryError: OOM", 2: RANK})
    with pytest.raises(SearchlabError, match="after 3 failed trials in a row"):
        runner.run(study, opts, MemoryTracker(), train=differ)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("SEARCHLAB_HOME", str(other / "home"))  # a new keras-tuner oracle too
    after = FakeTrainer(early={1: RANK, 2: RANK, 3: RANK})  # trial 0 completes first
    with pytest.raises(SearchlabError, match="after 3 failed trials in a row"):
        runner.run(
            study, options(other, engine, study, max_failures=3), MemoryTracker(), train=after
        )
    assert len(after.calls) == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_fails_the_running_trial_and_kills_the_session(tmp_path, tells, engine):
    study = make_study("random", trials=4)
    tracker = MemoryTracker()
    with pytest.raises(KeyboardInterrupt):
        runner.run(study, options(tmp_path, engine, study), tracker, train=FakeTrainer(interrupt=1))
    trials = stored(tmp_path).trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAILED]
    assert trials[1].error == "interrupted (Ctrl-C)"
    assert [r.state for _, r in tells] == [TrialState.COMPLETE, TrialState.FAILED]
    statuses = {
        r.tags.get("searchlab.role", "trial"): r.status
        for r in tracker.runs("contract")
        if r.run_id in (tracker.session_id, trials[1].run_id)
    }
    assert statuses == {"session": "KILLED", "trial": "FAILED"}


def test_the_optuna_engine_prunes_through_its_pruner(tmp_path, tells):
    study = make_study("random", trials=8)
    opts = options(tmp_path, "optuna", study, pruner="median", prune_min_epochs=1)
    tracker = MemoryTracker()
    runner.run(study, opts, tracker, train=FakeTrainer())
    trials = stored(tmp_path).trials()
    pruned = [t for t in trials if t.state is TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in trials]
    for t in pruned:  # stopped before its last epoch, below the running median
        assert t.epochs is not None and t.epochs < study.epochs
        assert tracker.records[t.run_id]["status"] == "KILLED"
    assert len(tells) == len(trials)


def test_keras_tuner_hyperband_sets_each_trials_epochs(tmp_path, tells):
    study = make_study("hyperband", trials=6)
    trainer = FakeTrainer()
    tracker = MemoryTracker()
    runner.run(study, options(tmp_path, "keras-tuner", study), tracker, train=trainer)
    epochs = [e for _, _, e in trainer.calls]
    assert set(epochs) <= {1, 3} and 1 in epochs, epochs  # rounds of 1 and 3 epochs (factor 3)
    for (_number, _, e), (proposal, _) in zip(trainer.calls, tells, strict=True):
        assert proposal.tags["searchlab.kt.epochs"] == str(e)
    assert stored(tmp_path).finished_count() == 6


def test_a_worker_leaves_the_session_run_to_its_launcher(tmp_path, tells):
    # optuna only: --workers is refused for keras-tuner, whose oracle lives in one process
    engine = "optuna"
    study = make_study("random", trials=2)
    launcher = MemoryTracker()
    session_id = launcher.start_session("contract", {})
    opts = options(tmp_path, engine, study, parent_run_id=session_id, worker="1/1")
    worker = MemoryTracker()
    worker.records, worker.events = launcher.records, launcher.events  # one store, two clients
    summary = runner.run(study, opts, worker, train=FakeTrainer())
    assert summary["recycle"] is False and summary["session_complete"] == 2
    assert launcher.records[session_id]["status"] == "RUNNING"  # the launcher closes it
    trial_runs = [r for r in worker.runs("contract") if r.run_id != session_id]
    assert [r.tags["mlflow.parentRunId"] for r in trial_runs] == [session_id] * 2
    assert {r.status for r in trial_runs} == {"FINISHED"}


def test_processes_with_one_session_key_share_one_parent_run_closed_by_the_last(
    tmp_path, study_artifacts
):
    """``--session KEY``: the first process starts the parent run, a second attaches; the
    one that ends when no trial runs closes it (once); a process after that has nothing to
    do.  (Concurrently, on PostgreSQL and an MLflow server: tests/test_postgres.py.)"""
    from searchlab.errors import SessionOver

    study = make_study("random", trials=4)
    opts = options(tmp_path, "optuna", study, session_key="job-1")
    first = MemoryTracker()
    second = MemoryTracker()
    second.records, second.events = first.records, first.events  # one store, two processes

    def open_(tracker: MemoryTracker) -> runner.Session:
        engine, target, spec = runner.prepare(study, opts, check=False)
        return runner.Session.open(study, opts, tracker, engine, target)

    a, b = open_(first), open_(second)
    assert a.run_id == b.run_id and first.records[a.run_id]["tags"]["searchlab.session_key"] == (
        "job-1"
    )
    counts = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAILED: 0}
    spec = runner.trial_spec(study, opts)
    b.work(spec, engines.NullListener(), counts, FakeTrainer())  # b runs the budget
    # a ends first, with b's trials done: it is the last one running, and closes the session
    closed = a.end("FINISHED", dict(counts), spec)
    assert first.records[a.run_id]["status"] == "FINISHED"
    assert closed["session_complete"] == 4 and len(study_artifacts) == 1
    left = b.end("FINISHED", counts, spec)  # b comes after: leaves it be
    assert left["left_open"] and len(study_artifacts) == 1
    assert [e for e in first.events if e[0] == "end_session"] == [
        ("end_session", a.run_id, "FINISHED")
    ]
    with pytest.raises(SessionOver, match="is over"):
        open_(MemoryTracker())  # a fresh store knows nothing of the run: over all the same
    third = MemoryTracker()
    third.records, third.events = first.records, first.events
    with pytest.raises(SessionOver, match="'job-1'"):
        open_(third)


# -- keras-tuner's oracle after a crash -------------------------------------------------------


class Killed(BaseException):
    """Stands in for a SIGKILL at a chosen line: nothing in searchlab catches it as an error."""


def _kt_ids(tmp_path: Path) -> list[str]:
    return [
        t.attrs["kerastuner_trial_id"]
        for t in stored(tmp_path).trials(TrialState.COMPLETE)
        if "kerastuner_trial_id" in t.attrs
    ]


def test_a_trial_the_stores_finished_but_the_oracle_never_learned_is_not_run_again(
    tmp_path, monkeypatch
):
    """Killed after MLflow and Optuna recorded a trial, before the oracle did: the next
    session ends it in the oracle from the Optuna storage instead of proposing it again."""
    from searchlab.engines import kerastuner

    study = make_study("random", trials=4)
    tell = kerastuner.KerasTunerEngine.tell

    def tell_then_die(self, proposal, result):
        if result.number == 1:
            raise Killed
        tell(self, proposal, result)

    monkeypatch.setattr(kerastuner.KerasTunerEngine, "tell", tell_then_die)
    first = FakeTrainer()
    with pytest.raises(Killed):
        runner.run(study, options(tmp_path, "keras-tuner", study), MemoryTracker(), train=first)
    assert [t.state for t in stored(tmp_path).trials()] == [TrialState.COMPLETE] * 2
    monkeypatch.setattr(kerastuner.KerasTunerEngine, "tell", tell)

    again = FakeTrainer()
    runner.run(study, options(tmp_path, "keras-tuner", study), MemoryTracker(), train=again)
    assert len(again.calls) == 2  # trials 2 and 3: trial 1 is not trained a second time
    ids = _kt_ids(tmp_path)
    assert len(ids) == 4 and len(set(ids)) == 4, ids
    import keras_tuner as kt

    oracle = kerastuner.make_oracle(study, options(tmp_path, "keras-tuner", study))
    oracle._set_project_dir(str(kerastuner.state_dir("contract").parent), "contract")
    oracle.reload()
    statuses = {t.trial_id: t.status for t in oracle.trials.values()}
    assert sorted(statuses.values()) == [kt.engine.trial.TrialStatus.COMPLETED] * 4, statuses


def test_the_oracles_files_are_written_whole(tmp_path, monkeypatch):
    """Each state file goes through ``write_json`` (a temporary file renamed over it): this
    fails when KerasTuner stops saving through ``Oracle.save``/``Oracle._save_trial``."""
    from searchlab.engines import kerastuner

    written: list[str] = []
    write = kerastuner.write_json

    def spy(path, value):
        written.append(Path(path).name)
        write(path, value)

    monkeypatch.setattr(kerastuner, "write_json", spy)
    study = make_study("random", trials=2)
    runner.run(study, options(tmp_path, "keras-tuner", study), MemoryTracker(), train=FakeTrainer())
    assert {"oracle.json", "trial.json"} <= set(written), written
    folder = kerastuner.state_dir("contract")
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock",
        "oracle.json",
        "trial_0000",
        "trial_0001",
    ]  # no temporary file left behind


def test_a_damaged_oracle_state_is_one_clear_error(tmp_path):
    from searchlab.engines import kerastuner
    from searchlab.errors import StoreError

    study = make_study("random", trials=1)
    runner.run(study, options(tmp_path, "keras-tuner", study), MemoryTracker(), train=FakeTrainer())
    state = kerastuner.state_dir("contract") / "oracle.json"
    state.write_text(state.read_text()[:40])  # what an in-place write cut short left
    tracker = MemoryTracker()
    opts = options(tmp_path, "keras-tuner", study, trials=2)
    with pytest.raises(StoreError, match="cannot be read.*Delete that folder"):
        runner.run(study, opts, tracker, train=FakeTrainer())
    assert tracker.records == {}, "refused before the session's run was opened"


def test_a_second_keras_tuner_session_on_a_busy_study_is_refused(tmp_path):
    from searchlab.engines import kerastuner
    from searchlab.errors import StoreError

    study = make_study("random", trials=2)
    busy = kerastuner._hold(kerastuner.state_dir("contract"))  # as a live process would
    try:
        tracker = MemoryTracker()
        with pytest.raises(StoreError, match="Another searchlab run is using"):
            runner.run(study, options(tmp_path, "keras-tuner", study), tracker, train=FakeTrainer())
        assert tracker.records == {} and stored(tmp_path).count() == 0
    finally:
        busy.close()
    # once the other process is gone, the study runs (and two sessions in one process too)
    for trials in (1, 2):
        opts = options(tmp_path, "keras-tuner", study, trials=trials)
        runner.run(study, opts, MemoryTracker(), train=FakeTrainer())
    assert stored(tmp_path).finished_count() == 2


def test_both_engines_share_one_grid(tmp_path, tells):
    study = make_study("grid", trials=None)
    first, second = FakeTrainer(), FakeTrainer()
    runner.run(study, options(tmp_path, "optuna", study, trials=3), MemoryTracker(), train=first)
    runner.run(study, options(tmp_path, "keras-tuner", study), MemoryTracker(), train=second)
    points = [tuple(sorted(p.items())) for _, p, _ in first.calls + second.calls]
    assert len(points) == GRID_SIZE and len(set(points)) == GRID_SIZE
