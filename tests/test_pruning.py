"""Pruning: bad trials stop after their first epoch, count as pruned, end KILLED in MLflow."""

from __future__ import annotations

import pytest

# Half the space is terrible: bad=True trains with a learning rate of 0 (chance accuracy).
STUDY = """
import keras

from searchlab import Bool, Choice, Dataset, Study


def build(params, info):
    model = keras.Sequential([
        keras.Input(info.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(params["units"], activation="relu"),
        keras.layers.Dense(info.num_classes, activation="softmax"),
    ])
    lr = 0.0 if params["bad"] else 1e-2
    model.compile(keras.optimizers.SGD(learning_rate=lr, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(
    name="half-bad",
    space={"bad": Bool(), "units": Choice([16, 32, 64])},  # grid: the 3 good points run first
    model=build,
    data=Dataset("mnist", subset={"train": 512, "val": 256}),
    strategy="grid",
    epochs=2,
    batch_size=64,
)
"""


@pytest.mark.slow
def test_median_pruner_stops_the_bad_half_early_and_mlflow_says_killed(cli, project):
    import optuna

    from searchlab import config
    from searchlab.tracking import client
    from tests.conftest import mlflow_runs

    study_file = project / "half_bad.py"
    study_file.write_text(STUDY)
    result = cli("run", study_file, "--pruner", "median")
    assert result.exit_code == 0, result.output
    assert "3 complete, 3 pruned, 0 failed" in result.output

    ostudy = optuna.load_study(study_name="half-bad", storage=config.default_storage())
    states = {(t.params["bad"], t.params["units"]): t.state.name for t in ostudy.trials}
    assert states == {(False, u): "COMPLETE" for u in (16, 32, 64)} | {
        (True, u): "PRUNED" for u in (16, 32, 64)
    }
    runs = mlflow_runs(config.default_tracking_uri(), "half-bad")
    trials = [r for r in runs if r.data.tags.get("searchlab.role") != "session"]
    assert len(trials) == 6
    for run in trials:
        bad = run.data.params["bad"] == "True"
        assert run.info.status == ("KILLED" if bad else "FINISHED")
        assert run.data.tags["searchlab.state"] == ("pruned" if bad else "complete")
        assert run.data.metrics["epochs_run"] == (1 if bad else 2)  # stopped early: 1 of 2 epochs
        assert run.data.tags.get("searchlab.pruned_epoch") == ("1" if bad else None)
        assert "epoch_s" in run.data.metrics and run.data.params["units"]  # logged all the same
        weights = client(config.default_tracking_uri()).list_artifacts(run.info.run_id, "weights")
        assert len(weights) == (0 if bad else 1)  # a pruned trial's model is not kept
    session = [r for r in runs if r.data.tags.get("searchlab.role") == "session"][0]
    assert session.data.tags["searchlab.pruner"] == "median"  # as --pruner names it
    assert session.data.tags["searchlab.pruner_args"] == "min_epochs=1"
    assert session.data.metrics["n_pruned"] == 3 and session.data.metrics["n_failed"] == 0
