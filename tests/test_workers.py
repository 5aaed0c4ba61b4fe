"""``searchlab run --workers 3`` on one machine (SQLite storage): every grid point once, the
budget respected, every worker running trials, each a child run of the one session run, GPUs
pinned per worker."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from reliability_helpers import (
    BARRIER,
    Session,
    check_consistent,
    env_for,
    searchlab_cmd,
    write_study,
    write_study_with,
)

pytestmark = pytest.mark.slow
BUDGET = 5  # of the 6 grid points, so the budget (not the grid) stops the workers

#: Appended to the tiny study: its builder looks ``Hang`` up when it runs, so this one takes
#: the place of the study's, whose single marker file lets only the first process hang.  Here
#: every process writes its own marker ($SEARCHLAB_TEST_HANG.PID) and hangs in its first
#: training batch.
HANG_IN_EVERY_PROCESS = """


class Hang(keras.layers.Layer):
    def call(self, x, training=None):
        marker = Path(f"{os.environ['SEARCHLAB_TEST_HANG']}.{os.getpid()}")
        if training and not marker.exists():
            marker.write_text("in fit")
            for _ in range(6000):
                time.sleep(0.1)
        return x
"""


def wait_for_files(s: Session, folder: Path, pattern: str, count: int) -> None:
    """Block until ``count`` files match ``pattern`` in ``folder``, while ``s`` runs."""
    deadline = time.monotonic() + 240
    while len(list(folder.glob(pattern))) < count:
        if s.proc.poll() is not None or time.monotonic() > deadline:
            s.kill()
            raise AssertionError(f"never {count} files {pattern}; output:\n{s.finish()}")
        time.sleep(0.1)


def test_three_workers_share_one_study(project: Path) -> None:
    home = project / ".searchlab"
    barrier = project / "barrier"
    barrier.mkdir()
    s = Session(
        searchlab_cmd(
            write_study_with(project, BARRIER),
            "--trials",
            BUDGET,
            "--workers",
            3,
            "--gpus",
            "0,1,2",
        ),
        env_for(home, SEARCHLAB_TEST_BARRIER=str(barrier), SEARCHLAB_TEST_WORKERS="3"),
        project,
    )
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "trials: 5 complete" in out, out
    assert len(list(barrier.iterdir())) >= 3, "three worker processes built models"

    found = check_consistent(
        f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}", "tiny", BUDGET
    )
    assert len(found["trials"]) == BUDGET, "no trial was started beyond the budget"
    (session,) = found["sessions"]
    assert session.info.status == "FINISHED"
    assert session.data.tags["searchlab.workers"] == "3"
    runs = found["trial_runs"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {session.info.run_id}
    per_worker = Counter(r.data.tags["searchlab.worker"] for r in runs)
    assert set(per_worker) == {"1/3", "2/3", "3/3"}, per_worker  # each ran a trial (BARRIER)
    assert sum(per_worker.values()) == BUDGET
    pids = {t.user_attrs["searchlab.pid"] for t in found["trials"]}
    # three processes, not one under three labels (more if one was recycled: --recycle-mb)
    assert len(pids) >= 3, pids
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
        searchlab_cmd(write_study_with(project, HANG_IN_EVERY_PROCESS), "--workers", 2),
        env_for(home, SEARCHLAB_TEST_HANG=str(marker)),
        project,
    )
    wait_for_files(s, project, "in-fit.*", 2)  # both workers in model.fit, each in a trial
    s.kill(signal.SIGTERM)  # like Ctrl-C; the launcher passes it on to each worker
    out = s.finish()
    assert s.proc.returncode == 130, out
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"], out
    assert {t.user_attrs.get("error") for t in trials} == {"interrupted (Ctrl-C)"}
    assert len({t.user_attrs["searchlab.pid"] for t in trials}) == 2  # one trial per worker
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    (session,) = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    assert session.info.status == "KILLED"
    trial_runs = [r for r in runs if "searchlab.trial" in r.data.tags]
    assert sorted(r.data.tags["searchlab.worker"] for r in trial_runs) == ["1/2", "2/2"]
    assert {r.info.status for r in trial_runs} == {"FAILED"}


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
    result = cli("run", study, "--trials", 2, worker=True)  # as users run it
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
    s = Session(
        searchlab_cmd(write_study(project)),
        env_for(project / ".searchlab", SEARCHLAB_TEST_HANG=str(marker)),
        project,
    )
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
