"""The tracker contract (``tracking.Tracker``), run against ``MlflowTracker`` on a real SQLite
store and against ``MemoryTracker``, so the in-memory tracker the engine contract uses
behaves as the real one: the call order of its docstring, runs that end in the state of
their trial, nothing left RUNNING, and ``reconcile``'s rules for what a crash left open."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchlab.outcome import TrialResult, TrialState
from searchlab.tracking import MemoryTracker, MlflowTracker, Tracker


@pytest.fixture(params=["mlflow", "memory"])
def make(request, tmp_path: Path):
    """A factory of trackers on one store (two of them are two processes), for the study
    file ``tmp_path / "study.py"``."""
    source = tmp_path / "study.py"
    if request.param == "memory":
        first = MemoryTracker(source=source)

        def memory() -> Tracker:
            other = MemoryTracker(source=source)
            other.records, other.events = first.records, first.events  # one store
            return other

        return lambda: first if not first.events else memory()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return lambda: MlflowTracker(uri, tmp_path / "artifacts", source=source)


def result(number: int, state: TrialState, value: float | None = None) -> TrialResult:
    history = {"loss": [0.5, 0.4]} if state is not TrialState.FAILED else {}
    return TrialResult(
        number,
        {"a": number},
        state,
        value=value,
        history=history,
        error="boom" if state is TrialState.FAILED else None,
    )


def by_id(tracker: Tracker, name: str = "s") -> dict:
    return {r.run_id: r for r in tracker.runs(name)}


def test_a_session_ends_each_trial_in_its_state_and_closes_everything(make) -> None:
    tracker = make()
    tracker.connect()
    session = tracker.start_session("s", {"strategy": "grid", "space": {"a": "Int(1, 3)"}})
    assert tracker.session_id == session
    ids = {}
    for number, state in enumerate((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)):
        ids[state] = tracker.start_trial(number, {"a": number}, {"searchlab.engine": "x"})
        tracker.log_epoch(ids[state], 0, {"loss": 0.5})
        tracker.end_trial(
            ids[state], result(number, state, 0.9 if state is TrialState.COMPLETE else None)
        )
    left_open = tracker.start_trial(3, {"a": 3}, {})
    tracker.end_session({"best_value": 0.9, "best_params": {"a": 0}}, "FINISHED")

    runs = by_id(tracker)
    assert runs[session].status == "FINISHED"
    assert runs[session].tags["searchlab.role"] == "session"
    assert runs[session].tags["searchlab.strategy"] == "grid"
    assert runs[ids[TrialState.COMPLETE]].status == "FINISHED"
    assert runs[ids[TrialState.COMPLETE]].metrics["objective"] == 0.9
    assert runs[ids[TrialState.PRUNED]].status == "KILLED"
    assert runs[ids[TrialState.FAILED]].status == "FAILED"
    assert runs[left_open].status == "FAILED"  # a trial still open when the session ends
    for state, run_id in ids.items():
        run = runs[run_id]
        assert run.tags["mlflow.parentRunId"] == session
        assert run.tags["searchlab.state"] == state.value
        assert run.tags["searchlab.engine"] == "x"
        assert dict(run.params) == {"a": str(run.tags["searchlab.trial"])}


def test_a_worker_closes_only_its_own_runs(make) -> None:
    launcher = make()
    session = launcher.start_session("s", {})
    worker = make()
    worker.attach(session)
    mine = worker.start_trial(0, {"a": 0}, {})
    worker.close_all("FAILED")
    runs = by_id(launcher)
    assert runs[mine].status == "FAILED" and runs[mine].tags["mlflow.parentRunId"] == session
    assert runs[session].status == "RUNNING"  # the launcher's to close
    launcher.end_session({}, "KILLED")
    assert by_id(launcher)[session].status == "KILLED"


def test_reconcile_closes_what_a_dead_process_left_running(make) -> None:
    crashed = make()
    old = crashed.start_session("s", {})
    runs = {n: crashed.start_trial(n, {"a": n}, {}) for n in range(4)}
    now = make()
    current = now.start_session("s", {})
    assert now.previous_session("s") == old
    trials = {
        0: {"state": TrialState.COMPLETE, "value": 0.9, "run_id": runs[0]},
        1: {
            "state": TrialState.FAILED,
            "error": "interrupted: its worker is gone",
            "run_id": runs[1],
        },
        2: {"state": TrialState.RUNNING, "run_id": runs[2]},  # a live worker's trial
        3: {"state": TrialState.PRUNED, "run_id": runs[3]},
    }
    seen = []

    def dead(run) -> bool:
        seen.append(run.run_id)
        return True

    changed = now.reconcile("s", trials, session_dead=dead)
    got = by_id(now)
    assert [got[runs[n]].status for n in range(4)] == ["FINISHED", "FAILED", "RUNNING", "KILLED"]
    assert got[old].status == "FAILED" and got[current].status == "RUNNING"
    assert seen == [old]  # asked about the other session only, with a RunRecord
    assert len(changed) == 4
    assert now.reconcile("s", trials, session_dead=dead) == []  # nothing left to change
    now.end_session({}, "FINISHED")
    crashed.close_all()


def test_a_paused_trial_run_is_opened_again_and_goes_on_with_its_steps(make) -> None:
    """Resume inside a trial: the run a stopped process paused (KILLED) is the run the next
    one opens again; it says which epochs it has, and ends as any trial run."""
    first = make()
    first.start_session("s", {})
    run_id = first.start_trial(0, {"a": 0}, {})
    for epoch in (1, 2, 3):
        first.log_epoch(run_id, epoch, {"loss": 0.5, "epoch_s": 1.0})
    first.pause_trial(run_id, "interrupted after epoch 3")
    first.end_session({}, "KILLED")
    paused = by_id(first)[run_id]
    assert paused.status == "KILLED"  # not RUNNING, not FAILED by the session's close
    assert paused.tags["searchlab.paused"] == "interrupted after epoch 3"
    later = make()
    later.start_session("s", {})
    assert later.resume_trial(run_id, {"searchlab.resumed_in": str(later.session_id)}) == 3
    assert by_id(later)[run_id].status == "RUNNING"
    later.log_epoch(run_id, 4, {"loss": 0.4, "epoch_s": 1.0})
    later.end_trial(run_id, result(0, TrialState.COMPLETE, 0.9))
    later.end_session({}, "FINISHED")
    run = by_id(later)[run_id]
    assert run.status == "FINISHED" and run.tags["searchlab.resumed_in"] == later.session_id


def test_runs_of_an_unknown_study_are_none(make) -> None:
    tracker = make()
    tracker.start_session("s", {})
    assert tracker.runs("never-run") == []
    assert tracker.previous_session("never-run") is None
    tracker.end_session({}, "FINISHED")


def test_the_best_model_is_logged_on_the_session_and_registered_champion_only_if_better(
    make,
) -> None:
    import keras
    import numpy as np

    from searchlab.tracking import MODEL_URI_TAG, ModelScore

    tracker = make()
    session = tracker.start_session("s", {})
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    x = np.zeros((2, 3), dtype="float32")
    example = (x, model.predict(x, verbose=0))
    uri = tracker.log_model(model, example, requirements=["keras"], tags={"searchlab.trial": "0"})
    assert uri.startswith("models:/m-")
    assert by_id(tracker)[session].tags[MODEL_URI_TAG] == uri

    def register(value: float, trial_run: str):
        score = ModelScore("val_loss", "minimize", value)
        return tracker.register_model(uri, "m", score, tags={"searchlab.trial_run": trial_run})

    first = register(0.5, "a")
    assert (first.version, first.champion, first.previous_version) == ("1", True, None)
    worse = register(0.6, "b")
    assert (worse.version, worse.champion, worse.previous_version) == ("2", False, "1")
    assert worse.previous_value == 0.5 and "does not beat" in worse.reason
    same = register(0.5, "a")  # the champion's own trial: nothing new
    assert (same.version, same.champion) == ("1", True)
    better = register(0.4, "c")
    assert (better.version, better.champion, better.previous_version) == ("3", True, "1")
    assert register(0.45, "d").champion is False  # measured against version 3 now
    tracker.end_session({}, "FINISHED")


def test_runs_carry_mlflow_context_tags_and_dataset_inputs(make, tmp_path: Path) -> None:
    import getpass

    import numpy as np

    from searchlab.tracking import DataInput

    tracker = make()
    session = tracker.start_session("s", {})
    trial = tracker.start_trial(0, {"a": 0}, {})
    x, y = np.zeros((4, 2, 2), dtype="float32"), np.arange(4, dtype="int32")
    tracker.log_inputs(
        trial,
        [
            DataInput("toy", "train", "d-train", x, y, str(tmp_path / "toy.npz")),
            DataInput("toy", "validation", "d-val", x[:2], y[:2]),
        ],
    )
    tracker.end_trial(trial, result(0, TrialState.COMPLETE, 0.5))
    tracker.end_session({}, "FINISHED")
    runs = by_id(tracker)
    for run_id in (session, trial):  # the tags MLflow's start_run sets
        tags = runs[run_id].tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.name"] == str((tmp_path / "study.py").resolve())
        assert tags["mlflow.source.type"] == "LOCAL"
        assert not any(k.startswith("mlflow.source.git") for k in tags)  # tmp_path: no git
    assert [dict(i) for i in runs[trial].inputs] == [
        {"name": "toy", "context": "train", "digest": "d-train"},
        {"name": "toy", "context": "validation", "digest": "d-val"},
    ]
    assert runs[session].inputs == ()


def test_a_shared_session_is_left_open_by_all_but_the_process_that_closes_it(make) -> None:
    starter = make()
    session = starter.start_session("s", {})
    joined = make()
    joined.attach(session)
    mine = starter.start_trial(0, {"a": 0}, {})
    theirs = joined.start_trial(1, {"a": 1}, {})
    starter.leave()  # started it, but another process goes on with it
    assert starter.run_status(session) == "RUNNING" and starter.run_status(mine) == "FAILED"
    assert joined.run_status(theirs) == "RUNNING"
    joined.end_trial(theirs, result(1, TrialState.COMPLETE, 0.5))
    joined.attach(session, own=True)  # the last process: it closes the session
    joined.end_session({"best_value": 0.5}, "FINISHED")
    assert joined.run_status(session) == "FINISHED"
    assert joined.run_status("no-such-run") is None


def test_sessions_and_trials_have_names_that_tell_them_apart(make) -> None:
    """Two sessions of one study get two names (numbered, with their start); a trial run is
    named as the console names it (``trial 3 of 20 (#2)`` -> ``trial 3 (#2)``); params keep
    the digits the user wrote."""
    import re

    first = make()
    one = first.start_session("s", {})
    trial = first.start_trial(2, {"lr": 0.1 + 0.2, "units": 8}, {}, run_name="trial 3 (#2)")
    first.end_trial(trial, result(2, TrialState.COMPLETE, 0.5))
    first.end_session({}, "FINISHED")
    second = make()
    two = second.start_session("s", {})
    second.end_session({}, "FINISHED")
    runs = by_id(second)
    pattern = r"s session {} \(\d{{4}}-\d\d-\d\d \d\d:\d\d\)"
    assert re.fullmatch(pattern.format(1), runs[one].name), runs[one].name
    assert re.fullmatch(pattern.format(2), runs[two].name), runs[two].name
    assert runs[trial].name == "trial 3 (#2)"
    assert dict(runs[trial].params) == {"lr": "0.3", "units": "8"}


def test_the_logged_model_carries_its_trials_params_and_metrics_and_its_versions(
    make, tmp_path: Path
) -> None:
    """The best model's LoggedModel has the trial's params and the last value of each of the
    trial run's metrics; registering it records the version on it (``mlflow.modelVersions``),
    which is what the UI's model page shows as registered."""
    import json

    import keras
    import numpy as np

    from searchlab.tracking import MemoryTracker, ModelScore, client

    tracker = make()
    tracker.start_session("s", {})
    trial = tracker.start_trial(0, {"lr": 0.001, "units": 16}, {})
    tracker.log_epoch(trial, 1, {"val_loss": 0.7, "epoch_s": 1.0})
    tracker.log_epoch(trial, 2, {"val_loss": 0.6, "epoch_s": 1.0})
    tracker.end_trial(trial, result(0, TrialState.COMPLETE, 0.6))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    x = np.zeros((2, 3), dtype="float32")
    uri = tracker.log_model(
        model,
        (x, model.predict(x, verbose=0)),
        requirements=["keras"],
        tags={"searchlab.trial": "0"},
        params={"lr": 0.001, "units": 16},
        trial_run=trial,
    )
    score = ModelScore("val_loss", "minimize", 0.6)
    registered = tracker.register_model(uri, "m", score, tags={"searchlab.trial_run": trial})
    tracker.end_session({}, "FINISHED")
    if isinstance(tracker, MemoryTracker):
        logged = tracker.models[uri]
        params, metrics = logged["params"], logged["metrics"]
    else:
        c = client(tracker.uri)
        model_id = uri.removeprefix("models:/")
        got = c.get_logged_model(model_id)
        params = dict(got.params)
        metrics = {m.key: m.value for m in got.metrics}
        assert {m.run_id for m in got.metrics} == {trial}  # from the trial that trained it
        assert json.loads(got.tags["mlflow.modelVersions"]) == [
            {"name": "m", "version": int(registered.version)}
        ]
        # linked, not logged twice: each epoch is still one point of the trial's history
        assert [m.step for m in c.get_metric_history(trial, "val_loss")] == [1, 2]
    assert params == {"lr": "0.001", "units": "16"}
    assert metrics["val_loss"] == pytest.approx(0.6) and metrics["objective"] == pytest.approx(0.6)
