"""``searchlab.keras_tuner``: KerasTuner's scripts with one import changed.

The slow tests run keras-io's getting-started guide and TensorFlow's Keras Tuner tutorial
(copies under ``tests/user_code``, small budgets) to the end, and read their results back
from MLflow and Optuna as a user would; one checks that a user's ``EarlyStopping`` stops
trials early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mlflow_runs
from conftest import mnist_build_model as build_model

import searchlab.keras_tuner as kt
from searchlab.errors import SearchlabError

USER_CODE = Path(__file__).parent / "user_code"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: kt.RandomSearch(build_model, distribution_strategy=object()), "--gpus"),
        (lambda: kt.RandomSearch(build_model, max_retries_per_trial=2), "does not retry"),
        (lambda: kt.Hyperband(build_model, max_trials=3), "brackets"),
        (lambda: kt.RandomSearch(max_trials=3), "hypermodel="),
        (lambda: kt.BayesianOptimization(build_model, num_initial_points=2), "GP sampler"),
    ],
)
def test_an_unsupported_argument_is_one_line_that_says_what_to_do(
    make, says, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kt.UnsupportedArgument) as info:
        make()
    assert isinstance(info.value, SearchlabError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert says in message and "\n" not in message


def test_keras_tuners_own_classes_come_from_keras_tuner() -> None:
    import keras_tuner

    assert kt.HyperModel is keras_tuner.HyperModel
    assert kt.Objective is keras_tuner.Objective
    assert kt.HyperParameters is keras_tuner.HyperParameters


def test_hyperband_tries_as_many_configurations_as_keras_tuners_brackets() -> None:
    # KerasTuner's Hyperband with max_epochs=10, factor=3: brackets of 9, 5 and 3 models
    assert kt.hyperband_trials(10, 3, 1) == 17
    assert kt.hyperband_trials(3, 3, 2) == 10  # brackets of 3 and 2, twice
    assert kt.hyperband_trials(1, 3, 1) == 1


@pytest.fixture
def keras_home(project: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``keras.datasets.mnist.load_data()`` finds the data folder's mnist.npz (the same file
    and hash Keras downloads) instead of downloading it."""
    home = project / "keras-home"
    (home / "datasets").mkdir(parents=True)
    (home / "datasets" / "mnist.npz").symlink_to(data_dir / "mnist.npz")
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _trial_runs(project_dir: Path, name: str) -> list:
    runs = mlflow_runs(f"sqlite:///{project_dir / 'mlflow.db'}", name)
    assert all(r.info.status != "RUNNING" for r in runs)
    return [r for r in runs if "searchlab.trial" in r.data.tags]


def _run_script(script: Path, folder: Path) -> str:
    """Run a user's script as they would (``python script.py`` in their folder): in its own
    process, so Keras reads ``$KERAS_HOME`` when it is imported, as it does for a user (it
    reads it once, at import: this test process imported Keras long before)."""
    done = subprocess.run(
        [sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_keras_ios_getting_started_guide_runs_to_the_end(project, keras_home) -> None:
    out = _run_script(USER_CODE / "kt_getting_started.py", project)
    assert "Default search space size: 5" in out
    assert 'Objective(name="val_accuracy", direction="max")' in out
    assert 'Objective(name="val_mean_absolute_error", direction="min")' in out
    for name in ("helloworld", "tune_hypermodel", "built_in_metrics", "custom_metrics",
                 "custom_eval", "custom_eval_dict"):  # fmt: skip
        runs = _trial_runs(project / "my_dir" / name, name)
        assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), name
    # executions_per_trial=2: each execution's metrics are logged, the value is their mean
    helloworld = _trial_runs(project / "my_dir" / "helloworld", "helloworld")
    assert all("execution_2/val_accuracy" in r.data.metrics for r in helloworld)
    # the number HyperRegressor.fit returns, no objective given: minimised as KerasTuner's
    # default_objective, the best (lowest MAE) trial first
    custom_eval = out.split("custom_eval_dict")[0].split('Objective(name="default_objective"')
    assert len(custom_eval) == 2 and custom_eval[1].startswith(', direction="min")')
    maes = [float(line.split()[1]) for line in custom_eval[1].splitlines()
            if line.startswith("Score:")]  # fmt: skip
    assert len(maes) == 3 and maes == sorted(maes)
    # the dict that HyperRegressor.fit returns: metric_a is maximised, the best trial first
    scores = [float(line.split()[1]) for line in out.split("custom_eval_dict")[-1].splitlines()
              if line.startswith("Score:")]  # fmt: skip
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_tensorflows_keras_tuner_tutorial_runs_to_the_end(project, keras_home) -> None:
    out = _run_script(USER_CODE / "kt_intro_tutorial.py", project)
    assert "The optimal number of units" in out and "[test loss, test accuracy]" in out
    runs = _trial_runs(project / "my_dir" / "intro_to_kt", "intro_to_kt")
    assert len(runs) == kt.hyperband_trials(3, 3, 1) == 5


@pytest.mark.slow
def test_early_stopping_stops_trials_early_and_the_best_models_are_the_best(project) -> None:
    import keras

    data = np.load(_mnist())
    x, y = data["x_train"][:800].astype("float32") / 255.0, data["y_train"][:800]
    tuner = kt.RandomSearch(build_model, objective="val_accuracy", max_trials=2,
                            directory=project / "kt", project_name="stops")  # fmt: skip
    # nothing improves the loss by 100: patience 0 stops each trial after its second epoch
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100, patience=0)
    tuner.search(x[:600], y[:600], epochs=5, validation_data=(x[600:], y[600:]), callbacks=[stop])
    runs = _trial_runs(project / "kt" / "stops", "stops")
    assert len(runs) == 2
    client = __import__("searchlab.tracking", fromlist=["client"]).client(tuner.tracking_uri)
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
    best = tuner.oracle.get_best_trials(2)
    assert best[0].score >= best[1].score
    model = tuner.get_best_models(1)[0]
    _, accuracy = model.evaluate(x[600:], y[600:], verbose=0)
    assert accuracy == pytest.approx(best[0].score, abs=1e-6)
    assert tuner.get_best_hyperparameters(1)[0].values == best[0].hyperparameters.values


def _mnist() -> Path:
    import os

    return Path(os.environ["SEARCHLAB_DATA_DIR"]) / "mnist.npz"


@pytest.mark.slow
def test_search_takes_tf_data_and_py_datasets_in_grid_and_bayesian_search(project) -> None:
    import keras
    import tensorflow as tf

    data = np.load(_mnist())
    x, y = data["x_train"][:600].astype("float32") / 255.0, data["y_train"][:600]
    train = tf.data.Dataset.from_tensor_slices((x[:500], y[:500])).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x[500:], y[500:])).batch(32)
    grid = kt.GridSearch(build_model, objective="val_accuracy", max_trials=2,
                         directory=project / "kt", project_name="tfdata")  # fmt: skip
    grid.search(train, validation_data=val, epochs=1, verbose=0)
    # the grid's first two points, in the order KerasTuner's GridSearch walks them
    assert sorted(t.hyperparameters.get("units") for t in grid.oracle.get_best_trials(5)) == [
        16,
        32,
    ]

    class Rows(keras.utils.PyDataset):
        def __init__(self, x, y) -> None:
            super().__init__()
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x) // 50

        def __getitem__(self, i):
            return self.x[i * 50 : (i + 1) * 50], self.y[i * 50 : (i + 1) * 50]

    bayes = kt.BayesianOptimization(build_model, objective="val_accuracy", max_trials=2,
                                    directory=project / "kt", project_name="pyds")  # fmt: skip
    bayes.search(Rows(x[:500], y[:500]), validation_data=Rows(x[500:], y[500:]), epochs=1)
    assert len(_trial_runs(project / "kt" / "pyds", "pyds")) == 2


def test_compile_overrides_replace_the_builders_as_in_keras_tuners_guide(tmp_path) -> None:
    import keras

    # keras-io's "Tailor the search space": override the optimizer and the loss
    tuner = kt.RandomSearch(build_model, optimizer=keras.optimizers.SGD(learning_rate=0.5),
                            loss="mse", max_trials=1, directory=tmp_path)  # fmt: skip
    model = tuner._space.builder({"units": 16})
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.loss == "mse"
    assert "accuracy" in str(model.get_compile_config()["metrics"])
