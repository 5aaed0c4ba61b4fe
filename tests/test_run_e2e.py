"""End-to-end: real MNIST subsets from the data directory, real Optuna and MLflow stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from searchlab import config, load_study
from searchlab.tracking import client
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow
MNIST = STUDIES / "mnist_dense.py"
QUICK = ("--epochs", "2", "--subset", "300,100")


def runs_of(experiment: str) -> tuple[list, list]:
    c = client(config.default_tracking_uri())
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, sorted(children, key=lambda r: int(r.data.tags["searchlab.trial"]))


def artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    c = client(config.default_tracking_uri())
    return {a.path for a in c.list_artifacts(run_id, path)}


def optuna_trials(name: str) -> list:
    import optuna

    from searchlab.store import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(config.default_storage())).trials


@pytest.mark.parametrize("strategy", ["grid", "random", "bayesian"])
def test_each_strategy_lands_in_mlflow(cli, project: Path, strategy: str) -> None:
    result = cli("run", MNIST, "--strategy", strategy, "--trials", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert "trial 1 of 2" in result.output and "trial 2 of 2" in result.output
    assert "best so far" in result.output

    parents, children = runs_of("mnist-dense")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    c = client(config.default_tracking_uri())
    for number, child in enumerate(children):
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert tags["searchlab.trial"] == str(number)
        assert tags["searchlab.state"] == "complete"
        assert tags["searchlab.strategy"] == strategy
        assert tags["searchlab.engine"] == "optuna"
        assert tags["searchlab.study"] == "mnist-dense"
        assert set(child.data.params) == {
            "layers",
            "units",
            "dropout",
            "learning_rate",
            "batch_size",
        }
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            steps = [m.step for m in c.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [1, 2], key  # epochs numbered from 1
        history = c.get_metric_history(child.info.run_id, "val_accuracy")
        assert child.data.metrics["objective"] == pytest.approx(max(m.value for m in history))
        assert "weights/best.weights.h5" in artifact_paths(child.info.run_id, "weights")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 2
    assert parent.data.metrics["best_value"] == pytest.approx(
        max(ch.data.metrics["objective"] for ch in children)
    )
    best = max(children, key=lambda ch: ch.data.metrics["objective"])
    assert parent.data.params["best.units"] == best.data.params["units"]
    assert "trials.csv" in artifact_paths(parent.info.run_id)
    (model,) = parent.outputs.model_outputs  # the best model, an MLflow Model
    assert parent.data.tags["searchlab.model_uri"] == f"models:/{model.model_id}"
    trials = optuna_trials("mnist-dense")
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == [ch.info.run_id for ch in children]


def test_running_again_continues_instead_of_repeating(cli, project: Path) -> None:
    assert cli("run", MNIST, "--strategy", "random", "--trials", "2", *QUICK).exit_code == 0
    second = cli("run", MNIST, "--strategy", "random", "--trials", "3", *QUICK)
    assert second.exit_code == 0, second.output
    assert "2 already finished" in second.output and "trial 3 of 3" in second.output
    trials = optuna_trials("mnist-dense")
    assert len(trials) == 3
    keys = {tuple(sorted(t.params.items())) for t in trials}
    assert len(keys) == 3, "the resumed session must not replay the first session's params"
    third = cli("run", MNIST, "--strategy", "random", "--trials", "3", *QUICK)
    assert third.exit_code == 0 and "trial " not in third.output.replace("trials:", "")
    parents, children = runs_of("mnist-dense")
    assert len(parents) == 3 and len(children) == 3


GRID_STUDY = """
from searchlab import Study, Choice, Dataset
from searchlab.models import dense_classifier
study = Study(name="grid3", space={"units": Choice([8, 16, 32])}, model=dense_classifier,
              data=Dataset("mnist", subset={"train": 200, "val": 100}),
              strategy="grid", trials=None, epochs=1)
"""


def test_grid_runs_every_point_exactly_once_across_sessions(cli, project: Path) -> None:
    (project / "grid3.py").write_text(GRID_STUDY)
    first = cli("run", "grid3.py", "--trials", "2")
    assert first.exit_code == 0, first.output
    second = cli("run", "grid3.py")
    assert second.exit_code == 0, second.output
    assert "trial 3 of 3" in second.output
    assert cli("run", "grid3.py").exit_code == 0
    trials = optuna_trials("grid3")
    assert sorted(t.params["units"] for t in trials) == [8, 16, 32]


NAN_STUDY = """
import keras
from searchlab import Study, Choice, Dataset

def build(params, info):
    model = keras.Sequential([keras.Input(info.input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(info.num_classes, activation="softmax")])
    loss = "sparse_categorical_crossentropy"
    if params["explode"]:
        def loss(y_true, y_pred):
            return keras.ops.mean(y_pred) * float("nan")
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    return model

study = Study(name="nan", space={"explode": Choice([True, False])}, model=build,
              data=Dataset("mnist", subset={"train": 200, "val": 100}),
              strategy="grid", trials=None, epochs=2)
"""


def test_a_nan_trial_fails_alone_and_the_study_completes(cli, project: Path) -> None:
    (project / "nan.py").write_text(NAN_STUDY)
    result = cli("run", "nan.py")
    assert result.exit_code == 0, result.output
    assert "failed: NaN/inf loss" in result.output
    parents, children = runs_of("nan")
    by_state = {ch.data.tags["searchlab.state"]: ch for ch in children}
    assert set(by_state) == {"failed", "complete"}
    assert by_state["failed"].info.status == "FAILED"
    assert "NaN/inf loss" in by_state["failed"].data.tags["searchlab.error"]
    assert by_state["complete"].info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["n_failed"] == 1


def test_export_h5_and_keras_reload_and_predict_identically(cli, project: Path) -> None:
    import keras

    assert cli("run", MNIST, "--strategy", "random", "--trials", "2", *QUICK).exit_code == 0
    for name in ("best.h5", "best.keras"):
        result = cli("export", MNIST, "-o", name)
        assert result.exit_code == 0, result.output
        assert f"wrote {name}: trial #" in result.output

    import mlflow

    parents, _ = runs_of("mnist-dense")
    mlflow.set_tracking_uri(config.default_tracking_uri())
    reference = mlflow.keras.load_model(parents[0].data.tags["searchlab.model_uri"])
    x = np.random.default_rng(0).random((16, 28, 28), dtype=np.float32)
    expected = reference.predict(x, verbose=0)
    for name in ("best.h5", "best.keras"):
        model = keras.models.load_model(project / name)
        np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)


def test_gp_strategy_needs_pytorch_or_runs(cli, project: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        result = cli("run", MNIST, "--strategy", "gp", "--trials", "1", *QUICK)
        assert result.exit_code == 1
        assert "needs PyTorch" in result.output
    else:
        result = cli("run", MNIST, "--strategy", "gp", "--trials", "2", *QUICK)
        assert result.exit_code == 0, result.output


def test_study_file_loads_the_shipped_data_subset(project: Path) -> None:
    from searchlab import data

    study = load_study(MNIST)
    loaded = data.load(study.dataset)
    assert loaded.x_train.shape == (54000, 28, 28) and loaded.x_val.shape == (6000, 28, 28)
    assert loaded.x_train.dtype == np.float32 and float(loaded.x_train.max()) <= 1.0
