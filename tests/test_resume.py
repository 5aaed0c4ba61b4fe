"""Crash and resume: SIGKILL a running ``searchlab run`` at several points, resume, and check
that Optuna and MLflow agree; Ctrl-C (SIGINT) closes the running trial and every run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from reliability_helpers import (
    Session,
    check_consistent,
    env_for,
    searchlab_cmd,
    unshare,
    write_study,
)

pytestmark = pytest.mark.slow
BUDGET = 4  # of the 6 grid points


def _stores(home: Path) -> tuple[str, str]:
    return f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}"


def test_sigkill_at_several_points_then_resume(project: Path) -> None:
    home = project / ".searchlab"
    study = write_study(project)
    cmd = searchlab_cmd(study, "--trials", BUDGET)
    env = env_for(home)

    # 1. during start-up: the session's parent run exists, no trial has started
    s = Session(cmd, env, project)
    s.wait_for(lambda line: line.startswith("study tiny"))
    s.kill()
    s.finish()

    # 2. during fit: the first training batch of a trial is running
    marker = project / "in-fit"
    s = Session(cmd, env_for(home, SEARCHLAB_TEST_HANG=str(marker)), project)
    s.wait_for_file(marker)
    s.kill()
    out = s.finish()
    assert "complete:" not in out

    # 3. right after a trial completed (both stores written, the next trial not yet begun)
    s = Session(cmd, env, project)
    s.wait_for(lambda line: "complete:" in line)
    s.kill()
    s.finish()

    # 4. resume to the end, in a worker process that recycles itself after every trial
    #    (--recycle-mb 0), as a long search that sheds memory would
    s = Session([*cmd, "--workers", "1", "--recycle-mb", "0"], env, project)
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "trials: 4 complete" in out, out

    storage, tracking = _stores(home)
    found = check_consistent(storage, tracking, "tiny", BUDGET)
    failed = [t for t in found["trials"] if t.state.name == "FAIL"]
    # the trial killed during fit; the kill "right after a trial" may also land after the
    # next trial was claimed, which then fails the same way
    assert 1 <= len(failed) <= 2, [t.user_attrs.get("error") for t in failed]
    assert all("interrupted" in t.user_attrs["error"] for t in failed)
    sessions = found["sessions"]
    assert len(sessions) == 4
    ended = sorted(r.info.status for r in sessions)
    assert ended == ["FAILED", "FAILED", "FAILED", "FINISHED"], ended
    last = max(sessions, key=lambda r: r.info.start_time)
    assert last.data.tags["searchlab.optuna_study"] == "tiny"
    assert last.data.tags["searchlab.previous_session"] in {r.info.run_id for r in sessions}
    assert int(last.data.tags["searchlab.resumed_with"]) >= 1
    last_trials = [
        t for t in found["trials"] if t.user_attrs.get("searchlab.session") == last.info.run_id
    ]
    assert len({t.user_attrs["searchlab.pid"] for t in last_trials}) >= 2, "worker recycled"


def test_ctrl_c_marks_the_running_trial_failed_and_closes_every_run(project: Path) -> None:
    home = project / ".searchlab"
    study = write_study(project)
    marker = project / "in-fit"
    s = Session(searchlab_cmd(study), env_for(home, SEARCHLAB_TEST_HANG=str(marker)), project)
    s.wait_for_file(marker)
    s.kill(signal.SIGINT)
    out = s.finish()
    assert s.proc.returncode == 130, out
    assert "error: interrupted" in out

    import optuna
    from mlflow.tracking import MlflowClient

    storage, tracking = _stores(home)
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"]
    assert trials[0].user_attrs["error"] == "interrupted (Ctrl-C)"
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    status = {r.data.tags.get("searchlab.role", "trial"): r.info.status for r in runs}
    assert status == {"session": "KILLED", "trial": "FAILED"}


def test_a_launcher_that_ran_as_pid_1_is_closed_by_the_next_run(project: Path) -> None:
    """A container's entrypoint is PID 1 in its own PID namespace, on a host where PID 1 is
    alive for ever: killed, its parent run must not look alive to the next run."""
    import os
    import time

    from mlflow.tracking import MlflowClient

    prefix = unshare("--pid", "--fork", "--mount-proc", "--kill-child", probe='test "$$" = 1')
    home = project / ".searchlab"
    study = write_study(project)
    marker = project / "in-fit"
    s = Session(  # in-process: PID 1 opens the session and trains
        [*prefix, *searchlab_cmd(study, "--trials", 2, "--in-process")],
        env_for(home, SEARCHLAB_TEST_HANG=str(marker)),
        project,
    )
    s.wait_for_file(marker)  # inside model.fit
    pid_one = next(  # the launcher: PID 1 of the namespace, unshare's child here
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and (p / "stat").exists()
        and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(s.proc.pid)
    )
    os.kill(pid_one, signal.SIGKILL)  # PID 1 takes its whole namespace down with it
    s.finish(timeout=60)

    storage, tracking = _stores(home)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (dead,) = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    assert dead.data.tags["searchlab.pid"] == "1" and dead.info.status == "RUNNING"

    started = time.monotonic()
    again = Session(searchlab_cmd(study, "--trials", 2, "--in-process"), env_for(home), project)
    out = again.finish()
    assert again.proc.returncode == 0, out
    assert "trials: 2 complete" in out, out
    assert time.monotonic() - started < 120, "no wait for a heartbeat to go stale"
    found = check_consistent(storage, tracking, "tiny", 2)
    status = {r.info.run_id: r.info.status for r in found["sessions"]}
    assert status[dead.info.run_id] == "FAILED", status
    failed = [t for t in found["trials"] if t.state.name == "FAIL"]
    assert len(failed) == 1 and "is gone" in failed[0].user_attrs["error"], [
        t.user_attrs.get("error") for t in failed
    ]
