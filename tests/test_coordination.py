"""Claims, stale trials and MLflow reconciliation, without training: fast unit tests of
``searchlab.coordination`` and ``MlflowTracker.reconcile``."""

from __future__ import annotations

import datetime
import multiprocessing
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from reliability_helpers import claim_grid_points

from searchlab import coordination
from searchlab.coordination import Claim, claim_trial, fail_stale_trials
from searchlab.engines.optuna import propose_grid
from searchlab.outcome import Proposal
from searchlab.store import StudyStore, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def store(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="grid", storage=storage, direction="maximize")
    lock = coordination.StudyLock(
        storage=storage, storage_url=url, study_name="grid", lock_dir=tmp_path
    )
    return url, storage, study, lock


def claim(study, lock, *, target, grid, session):
    """One claim as the runner makes it: grid points from the Optuna engine's proposals
    (or the sampler's pick), the param ``a`` suggested under the lock."""
    store = StudyStore(study, study._storage, "")
    return claim_trial(
        store,
        lock,
        target=target,
        session=session,
        propose=lambda: propose_grid(store, grid, session) if grid else Proposal(),
        suggest=lambda trial: {"a": trial.suggest_int("a", 0, 100)},
    )


def test_claims_respect_the_budget_counting_running_trials(store) -> None:
    _, _, study, lock = store
    first = claim(study, lock, target=2, grid=None, session="s")
    second = claim(study, lock, target=2, grid=None, session="s")
    assert first.state is second.state is Claim.TRIAL
    assert claim(study, lock, target=2, grid=None, session="s").state is Claim.WAIT
    study.tell(first.trial, 0.5)
    assert claim(study, lock, target=2, grid=None, session="s").state is Claim.WAIT
    study.tell(second.trial, state=TrialState.FAIL)  # a failed trial does not count
    third = claim(study, lock, target=2, grid=None, session="s")
    assert third.state is Claim.TRIAL
    study.tell(third.trial, 0.6)
    assert claim(study, lock, target=2, grid=None, session="s").state is Claim.DONE
    owner = third.trial.study.trials[-1].user_attrs
    assert owner[coordination.PID_ATTR] > 0 and owner[coordination.SESSION_ATTR] == "s"


def test_grid_claims_never_share_a_point_and_failed_points_wait_for_a_new_session(store) -> None:
    _, _, study, lock = store
    grid = [{"a": 1}, {"a": 2}]
    one = claim(study, lock, target=None, grid=grid, session="s")
    two = claim(study, lock, target=None, grid=grid, session="s")
    assert one.params == {"a": 1} and one.trial.params == {"a": 1}  # stored inside the claim
    assert two.params == {"a": 2}
    assert claim(study, lock, target=None, grid=grid, session="s").state is Claim.WAIT
    study.tell(one.trial, state=TrialState.FAIL)
    assert claim(study, lock, target=None, grid=grid, session="s").state is Claim.WAIT
    again = claim(study, lock, target=None, grid=grid, session="next-session")
    assert again.params == {"a": 1}
    study.tell(again.trial, 1.0)
    study.tell(two.trial, 2.0)
    assert claim(study, lock, target=None, grid=grid, session="s").state is Claim.DONE


def test_a_point_enqueued_by_a_claimer_that_died_is_not_left_waiting(store) -> None:
    """A kill (or Ctrl-C) between ``enqueue_trial`` and ``ask`` left one WAITING trial that
    every later claim replaced with another: the next claim fails it, its point runs."""
    _, _, study, lock = store
    grid = [{"a": 1}, {"a": 2}]
    study.enqueue_trial({"a": 1})  # what the dead claimer left
    first = claim(study, lock, target=None, grid=grid, session="s")
    assert first.state is Claim.TRIAL
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING], states
    assert "between enqueueing and starting" in study.trials[0].user_attrs["error"]
    assert first.failed_stale == (0,)  # so the runner reconciles MLflow
    study.tell(first.trial, 1.0)
    second = claim(study, lock, target=None, grid=grid, session="s")
    study.tell(second.trial, 2.0)
    assert claim(study, lock, target=None, grid=grid, session="s").state is Claim.DONE
    assert sorted(t.params["a"] for t in study.trials if t.state == TrialState.COMPLETE) == [1, 2]
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


def test_three_processes_claim_distinct_grid_points(store, tmp_path: Path) -> None:
    url = store[0]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(claim_grid_points, [(url, str(tmp_path), 4)] * 3)
    claimed = sorted(v for values in results for v in values)
    assert claimed == list(range(12)), results


def test_stale_trials_fail_by_dead_pid_or_old_heartbeat(store) -> None:
    import sqlalchemy

    _, storage, study, lock = store
    dead, elsewhere, alive = (
        claim(study, lock, target=None, grid=None, session="s").trial for _ in range(3)
    )
    proc = subprocess.Popen(["true"])  # its pid no longer exists once it is reaped
    proc.wait()
    storage.set_trial_user_attr(dead._trial_id, coordination.PID_ATTR, proc.pid)
    storage.set_trial_user_attr(elsewhere._trial_id, coordination.HOST_ATTR, "another-machine")
    old = datetime.datetime.now() - datetime.timedelta(days=1)
    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t WHERE trial_id = :i"),
            {"t": old, "i": elsewhere._trial_id},
        )
    with pytest.warns(UserWarning, match="Heartbeat"):
        ownerless = study.ask()  # a claimer that died inside its claim, before owning it
    assert fail_stale_trials(StudyStore(study, storage, "")) == [dead.number, elsewhere.number]
    assert fail_stale_trials(StudyStore(study, storage, ""), locked=True) == [ownerless.number]
    states = {t.number: t.state for t in study.trials}
    assert states[alive.number] == TrialState.RUNNING
    errors = {t.number: t.error for t in StudyStore(study, storage, "").trials()}
    assert "is gone" in errors[dead.number]
    assert "sent no heartbeat" in errors[elsewhere.number]


def test_heartbeat_thread_records_beats(store) -> None:
    _, storage, study, lock = store
    import time

    import sqlalchemy

    trial = claim(study, lock, target=None, grid=None, session="s").trial

    def beat_time():
        with storage.engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :i"),
                {"i": trial._trial_id},
            ).scalar()

    first = beat_time()
    time.sleep(1.1)  # SQLite's now() has one-second resolution
    beat = coordination.Heartbeat(storage, trial._trial_id, interval=1).start()
    time.sleep(1.5)
    beat.stop()
    assert beat_time() > first


def test_reconcile_makes_mlflow_agree_with_optuna(tmp_path: Path) -> None:
    from searchlab import tracking
    from searchlab.outcome import TrialState as State
    from searchlab.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    crashed = MlflowTracker(uri, tmp_path / "art")
    crashed.start_session("s", {})
    runs = {n: crashed.start_trial(n, {"a": n}, {}) for n in range(5)}
    crashed.close_run(runs[2], "FINISHED")  # MLflow recorded it; Optuna never did
    old_session = crashed.session_id

    now = MlflowTracker(uri, tmp_path / "art")
    now.start_session("s", {})
    trials = {
        0: {"state": State.COMPLETE, "value": 0.9, "run_id": runs[0]},
        1: {"state": State.FAILED, "error": "interrupted: its worker is gone", "run_id": runs[1]},
        2: {"state": State.FAILED, "error": "interrupted: its worker is gone", "run_id": runs[2]},
        3: {"state": State.RUNNING, "run_id": runs[3]},  # a live worker's trial
        # 4: the process died before Optuna linked the run
    }
    changed = now.reconcile("s", trials, session_dead=lambda run: True)
    assert len(changed) == 5, changed
    client = tracking.client(uri)
    got = {n: client.get_run(r) for n, r in runs.items()}
    assert got[0].info.status == "FINISHED" and got[0].data.metrics["objective"] == 0.9
    assert got[1].info.status == "FAILED"
    assert got[1].data.tags["searchlab.error"] == "interrupted: its worker is gone"
    assert got[2].info.status == "FAILED"
    assert "Optuna never recorded" in got[2].data.tags["searchlab.error"]
    assert got[3].info.status == "RUNNING"
    assert got[4].info.status == "FAILED"
    assert client.get_run(old_session).info.status == "FAILED"
    assert client.get_run(now.session_id).info.status == "RUNNING"  # its own session
    assert now.reconcile("s", trials, session_dead=lambda run: True) == []  # idempotent
    now.close_all()
    crashed.close_all()
