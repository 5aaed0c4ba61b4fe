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
    assert "trials: 5 complete, 0 pruned, 0 failed" in out, out

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
    assert workers <= {"1/3", "2/3", "3/3"} and len(workers) >= 2, workers
    for r in runs:  # worker i sees GPU i only
        assert r.data.tags["searchlab.cuda_visible_devices"] == str(
            int(r.data.tags["searchlab.worker"][0]) - 1
        )
