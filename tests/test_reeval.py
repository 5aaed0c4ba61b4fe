"""Top-k re-evaluation: K x S tagged child runs of the K best of more trials than K, mean ±
std on the session, export by mean."""

from __future__ import annotations

import statistics

import pytest

STUDY = """
from searchlab import Choice, Dataset, Float, Study
from searchlab.models import dense_classifier

study = Study(
    name="reeval",
    space={"units": Choice([8, 16, 32]), "learning_rate": Float(1e-3, 3e-2, log=True)},
    model=dense_classifier,
    data=Dataset("mnist", subset={"train": 256, "val": 128}),
    strategy="random",
    trials=3,
    epochs=1,
    batch_size=64,
)
"""


@pytest.mark.slow
def test_reeval_runs_k_times_s_child_runs_and_export_picks_the_best_mean(cli, project):
    from searchlab import config
    from searchlab.tracking import MlflowTracker, client
    from tests.conftest import mlflow_runs

    study_file = project / "reeval_study.py"
    study_file.write_text(STUDY)
    result = cli(
        "run", study_file, "--engine", "keras-tuner", "--reeval-top", "2", "--reeval-seeds", "2"
    )
    assert result.exit_code == 0, result.output
    assert "re-evaluated: #" in result.output

    tracker = MlflowTracker(config.default_tracking_uri())
    runs = mlflow_runs(tracker.uri, "reeval")
    session = [r for r in runs if r.data.tags.get("searchlab.role") == "session"][0]
    search = [r for r in runs if r.info.run_name.startswith("trial ")]
    reeval = [r for r in runs if r.data.tags.get("searchlab.role") == "reeval"]
    assert len(search) == 3 and len(reeval) == 2 * 2
    assert {r.data.tags["mlflow.parentRunId"] for r in reeval} == {session.info.run_id}
    # the two best of the three (ties: the lower trial number), not the first two run
    ranked = sorted(
        search, key=lambda r: (-r.data.metrics["objective"], int(r.data.tags["searchlab.trial"]))
    )
    top2 = {r.data.tags["searchlab.trial"] for r in ranked[:2]}
    assert {r.data.tags["searchlab.reeval_of"] for r in reeval} == top2
    params_of = {r.data.tags["searchlab.trial"]: r.data.params for r in search}
    by_trial: dict[str, list[float]] = {}
    for r in reeval:
        assert r.info.status == "FINISHED"
        assert r.data.params == params_of[r.data.tags["searchlab.reeval_of"]]  # same config
        by_trial.setdefault(r.data.tags["searchlab.reeval_of"], []).append(
            r.data.metrics["objective"]
        )
    assert all(len(v) == 2 for v in by_trial.values())
    seeds = {r.data.tags["searchlab.reeval_seed"] for r in reeval}
    assert len(seeds) == 2  # the same two new seeds for each configuration
    best_mean = max(by_trial, key=lambda k: (statistics.fmean(by_trial[k]), -int(k)))
    assert session.data.metrics["selected_trial"] == int(best_mean)
    assert session.data.metrics["reeval_mean"] == pytest.approx(
        statistics.fmean(by_trial[best_mean])
    )
    assert session.data.metrics["reeval_std"] == pytest.approx(
        statistics.stdev(by_trial[best_mean])
    )
    names = [a.path for a in client(tracker.uri).list_artifacts(session.info.run_id)]
    assert "reeval.csv" in names

    result = cli("export", study_file, "-o", project / "best.keras")
    assert result.exit_code == 0, result.output
    assert f"trial #{best_mean} " in result.output
