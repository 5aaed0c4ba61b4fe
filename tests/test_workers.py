"""``searchlab run --workers 3`` on one machine (SQLite storage): every grid point once, the
budget respected, every trial a child run of the one session run, GPUs pinned per worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_helpers import Session, check_consistent, env_for, searchlab_cmd, write_study

pytestmark = pytest.mark.slow
BUDGET = 5  # of the 6 grid points, so the budget (not the grid) stops the workers


def test_three_workers_share_one_study(project: Path) -> None:
    home = project / ".searchlab"
    study = write_study(project)
    s = Session(
        searchlab_cmd(study, "--trials", BUDGET, "--workers", 3, "--gpus", "0,1,2"),
        env_for(home), project,
    )
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "trials: 5 complete" in out, out

    found = check_consistent(
        f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}", "tiny", BUDGET
    )
    assert len(found["trials"]) == BUDGET, "no trial was started beyond the budget"
    (session,) = found["sessions"]
    assert session.info.status == "FINISHED"
    assert session.data.tags["searchlab.workers"] == "3"
    runs = found["trial_runs"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {session.info.run_id}
    workers = {r.data.tags["searchlab.worker"] for r in runs}
    assert workers <= {"1/3", "2/3", "3/3"}, workers  # how many got a trial depends on timing
    for r in runs:  # worker i sees GPU i only
        assert r.data.tags["searchlab.cuda_visible_devices"] == str(
            int(r.data.tags["searchlab.worker"][0]) - 1
        )


def test_stopping_the_launcher_closes_every_worker_trial(project: Path) -> None:
    import signal

    import optuna
    from mlflow.tracking import MlflowClient

    home = project / ".searchlab"
    marker = project / "in-fit"
    s = Session(
        searchlab_cmd(write_study(project), "--workers", 2),
        env_for(home, SEARCHLAB_TEST_HANG=str(marker)), project,
    )
    s.wait_for_file(marker)
    s.kill(signal.SIGTERM)  # like Ctrl-C; the launcher passes it on to each worker
    out = s.finish()
    assert s.proc.returncode == 130, out
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials
    assert trials and all(t.state.name in ("FAIL", "COMPLETE") for t in trials)
    assert any(t.user_attrs.get("error") == "interrupted (Ctrl-C)" for t in trials)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    (session,) = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    assert session.info.status == "KILLED"


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_plain_run_trains_in_a_worker_and_in_process_stays_here(cli, project: Path) -> None:
    import os

    import optuna

    study = write_study(project)
    result = cli("run", study, "--trials", 2)
    assert result.exit_code == 0, result.output
    # the worker's progress reaches the launcher's output, without a worker prefix
    assert "trial 1 of 2 (#0)" in result.output and "[worker" not in result.output
    assert "trials: 2 complete" in result.output

    result = cli("run", study, "--trials", 3, "--in-process")
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{project / '.searchlab' / 'optuna.db'}"
    ).trials
    pids = [t.user_attrs["searchlab.pid"] for t in trials]
    assert pids[0] == pids[1] != os.getpid(), pids
    assert pids[2] == os.getpid(), pids

    result = cli("run", study, "--in-process", "--workers", 2)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: --workers/--gpus start")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find processes")
def test_kill_9_of_searchlab_run_takes_its_worker_down(project: Path) -> None:
    import signal
    import time

    marker = project / "in-fit"
    s = Session(searchlab_cmd(write_study(project)),
                env_for(project / ".searchlab", SEARCHLAB_TEST_HANG=str(marker)), project)
    s.wait_for_file(marker)  # written by the worker, inside model.fit
    workers = _children(s.proc.pid)
    assert workers, "the trial runs in a worker process"
    s.kill(signal.SIGKILL)
    s.finish()

    def running(pid: int) -> bool:
        try:  # a zombie has ended, it only waits to be reaped
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if running(pid)]
    assert not left, f"worker(s) {left} kept running after their launcher was killed"
