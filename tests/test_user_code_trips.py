"""What held-out user code tripped on (issue 27), each as a new user would write it: a builder
with another signature, a builder that calls MLflow itself, two failed trials in a row, and
random search over a small discrete space.

Trials here train nothing (``FakeTrainer`` from the engine contract) except the autolog test,
which fits a tiny Keras model for one epoch."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_engine_contract
from conftest import mlflow_runs
from test_engine_contract import FakeTrainer, options, tiny_data

from searchlab import Dataset, engines, runner
from searchlab.errors import StudyDefinitionError
from searchlab.outcome import TrialState
from searchlab.space import Choice, Int
from searchlab.store import StudyStore
from searchlab.study import Study
from searchlab.tracking import MemoryTracker, MlflowTracker


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(runner.Session, "log_artifacts", lambda session, spec, summary: None)
    monkeypatch.setattr(test_engine_contract, "score", lambda params: 0.5)  # any space here
    return tmp_path


def study_of(model: Any, space: Any = None, **kw: Any) -> Study:
    values: dict[str, Any] = {
        "name": "trips",
        "space": space,
        "model": model,
        "data": Dataset(loader=tiny_data),
        "objective": "val_accuracy",
        "direction": "maximize",
        "strategy": "random",
        "trials": 3,
        "epochs": 1,
        "seed": 0,
    }
    values.update(kw)
    return Study(**values)


# ------------------------------------------------------------ a builder's signature


def create_model(num_features, trial):  # Optuna-examples' shape: data first, then the trial
    return None


def create_model_3(num_features, width, trial):
    return None


def test_a_builder_with_another_signature_says_what_is_wrong_with_it_and_where() -> None:
    line = create_model.__code__.co_firstlineno
    with pytest.raises(StudyDefinitionError) as info:
        study_of(create_model)
    message = str(info.value)
    assert message.startswith(f"{__file__}, line {line}: model=create_model ")
    assert "build_model(hp)" in message and "create_model(trial)" in message
    assert "create_model(num_features, trial)" in message
    assert "functools.partial(create_model, num_features=...)" in message
    assert "declare every hyperparameter" not in message and "\n" not in message


def test_a_partial_that_still_takes_two_arguments_names_the_users_function() -> None:
    line = create_model_3.__code__.co_firstlineno
    with pytest.raises(StudyDefinitionError) as info:
        study_of(functools.partial(create_model_3, 4))
    message = str(info.value)
    assert message.startswith(f"{__file__}, line {line}: model=functools.partial(create_model_3")
    assert "?, line 0" not in message


def test_a_declared_space_takes_build_params_or_build_params_info() -> None:
    space = {"a": Int(1, 3)}
    study_of(lambda params: None, space)
    study_of(lambda params, info: None, space)
    with pytest.raises(StudyDefinitionError, match=r"build\(params\) or build\(params, info\)"):
        study_of(lambda: None, space)


def broken_model(num_features, hp):
    units = hp.Int("units", 16, 64, step=16)
    raise RuntimeError(f"no data for {num_features} features, {units} units")


def test_a_partial_builder_that_fails_outside_a_trial_points_at_the_users_function() -> None:
    study = study_of(functools.partial(broken_model, 4))
    with pytest.raises(StudyDefinitionError) as info:
        study.search_space.describe()
    message = str(info.value)
    assert message.startswith(f"{__file__}, line ")
    assert "broken_model(hp) raised RuntimeError" in message and "?, line 0" not in message


# ------------------------------------------------------------ failed trials' numbers


class Places:
    """A listener that records each trial's console place."""

    def __init__(self) -> None:
        self.places: list[tuple[int, int]] = []

    def started(self, name, done, total, info) -> None:
        pass

    def trial_started(self, number, index, total, params) -> None:
        self.places.append((number, index))

    def epoch(self, number, epoch, epochs, logs) -> None:
        pass

    def trial_finished(self, result, best) -> None:
        pass

    def finished(self, summary) -> None:
        pass


def test_each_claimed_trial_has_its_own_place_on_the_console_and_in_its_run_name(tmp_path):
    study = study_of(lambda params: None, {"a": Int(1, 3), "b": Choice(["x", "y"])}, trials=2)
    tracker, listener = MemoryTracker(), Places()
    runner.run(
        study, options(tmp_path, "optuna", study), tracker, listener, train=FakeTrainer({0, 1})
    )
    assert listener.places == [(0, 1), (1, 2), (2, 3), (3, 4)]
    names = sorted(r.name for r in tracker.runs("trips") if "searchlab.trial" in r.tags)
    assert names == ["trial 1 (#0)", "trial 2 (#1)", "trial 3 (#2)", "trial 4 (#3)"]


def test_the_console_leaves_out_of_n_past_the_budget(capsys) -> None:
    from searchlab.cli import ConsoleProgress

    progress = ConsoleProgress("val_accuracy")
    progress.trial_started(1, 2, 4, {"a": 1})
    progress.trial_started(5, 6, 4, {"a": 1})
    out = capsys.readouterr().out
    assert "trial 2 of 4 (#1)" in out and "trial 6 (#5)" in out and "6 of 4" not in out


# ------------------------------------------------------------ random search repeats


@pytest.mark.parametrize("engine", list(engines.ENGINES))
def test_random_search_tries_distinct_configurations_of_a_small_space(tmp_path, engine) -> None:
    study = study_of(lambda params: None, {"units": Int(32, 128, step=32)})
    trainer = FakeTrainer()
    runner.run(study, options(tmp_path, engine, study), MemoryTracker(), train=trainer)
    tried = [params["units"] for _, params, _ in trainer.calls]
    assert len(set(tried)) == 3, tried  # seed 0 drew 96 three times before


def test_random_search_stays_reproducible_for_a_seed(tmp_path) -> None:
    runs = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        study = study_of(
            lambda params: None, {"units": Int(32, 128, step=32), "b": Choice(["x", "y"])}
        )
        trainer = FakeTrainer()
        runner.run(
            study, options(tmp_path / folder, "optuna", study), MemoryTracker(), train=trainer
        )
        runs.append([params for _, params, _ in trainer.calls])
    assert runs[0] == runs[1] and len({tuple(sorted(p.items())) for p in runs[0]}) == 3


def test_random_search_over_a_used_up_space_runs_a_repeat_and_says_so(tmp_path, caplog) -> None:
    study = study_of(lambda params: None, {"b": Choice(["x", "y"])})
    trainer = FakeTrainer()
    with caplog.at_level(logging.WARNING, logger="searchlab.engines.optuna"):
        runner.run(study, options(tmp_path, "optuna", study), MemoryTracker(), train=trainer)
    tried = [params["b"] for _, params, _ in trainer.calls]
    assert sorted(tried[:2]) == ["x", "y"] and len(tried) == 3
    assert "space may be used up" in caplog.text


# ------------------------------------------------------------ the user's own MLflow calls


class MlflowUser(FakeTrainer):
    """A trial whose code logs to MLflow itself, as a builder or a fit may."""

    def __call__(self, number, params, spec, workdir, on_epoch):
        import mlflow

        mlflow.log_param("user_param", number)  # the active run: the trial's
        with mlflow.start_run(run_name=f"mine {number}"):
            mlflow.log_metric("user_metric", 1.0)
        return super().__call__(number, params, spec, workdir, on_epoch)


def test_a_users_mlflow_runs_nest_under_the_trial_and_nothing_lands_in_the_cwd(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    study = study_of(lambda params: None, {"a": Int(1, 3)}, trials=2)
    tracker = MlflowTracker(uri, tmp_path / "artifacts")
    runner.run(study, options(tmp_path, "optuna", study), tracker, train=MlflowUser())

    runs = mlflow_runs(uri, "trips")
    trials = {r.info.run_id: r for r in runs if "searchlab.trial" in r.data.tags}
    mine = [r for r in runs if r.info.run_name.startswith("mine")]
    assert len(trials) == 2 and len(mine) == 2
    for run in mine:
        assert run.data.tags["mlflow.parentRunId"] in trials
        assert run.data.metrics == {"user_metric": 1.0}
    assert sorted(r.data.params["user_param"] for r in trials.values()) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert mlflow_runs(uri, "Default") == []  # nothing scattered at the top
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    import mlflow

    assert mlflow.active_run() is None and mlflow.start_run.__module__.startswith("mlflow")


def autologging_model(params):
    import keras
    import mlflow

    mlflow.keras.autolog()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.slow
def test_autologging_is_off_in_trials_and_said_once(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    study = study_of(autologging_model, {"a": Int(1, 3)}, trials=2)
    tracker = MlflowTracker(uri, tmp_path / "artifacts")
    with caplog.at_level(logging.WARNING, logger="searchlab.tracking"):
        runner.run(study, options(tmp_path, "optuna", study, epochs=1), tracker)
    runs = mlflow_runs(uri, "trips")
    store = StudyStore.load("trips", options(tmp_path, "optuna", study).storage)
    assert [t.state for t in store.trials()] == [TrialState.COMPLETE] * 2
    trials = [r for r in runs if "searchlab.trial" in r.data.tags]
    assert len(trials) == 2
    for run in trials:  # keras autolog's params are opt_name, opt_learning_rate, ...
        assert not any(k.startswith("opt_") for k in run.data.params), run.data.params
        assert "mlflow.autologging" not in run.data.tags
    assert mlflow_runs(uri, "Default") == []
    assert caplog.text.count("turns on MLflow autologging") == 1
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert np.isfinite(store.best().value)


MLFLOW_STUDY = """
import keras
import mlflow

from searchlab import Dataset, Study


def build_model(hp):
    mlflow.keras.autolog()  # as in MLflow's Keras examples
    with mlflow.start_run(nested=True):
        mlflow.log_param("user_units", hp.Int("units", 16, 32, step=16))
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(hp.get("units"), activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(name="own-mlflow", space=None, model=build_model, data=Dataset("mnist"),
              objective="val_accuracy", trials=1, epochs=1, seed=0)
"""


@pytest.mark.slow
def test_searchlab_run_of_a_builder_that_calls_mlflow_writes_nothing_in_the_cwd(cli, project):
    (project / "own_mlflow.py").write_text(MLFLOW_STUDY)
    result = cli("run", project / "own_mlflow.py", "--strategy", "random", "--subset", "300,100")
    assert result.exit_code == 0, result.output
    assert not (project / "mlruns").exists() and not (project / "mlflow.db").exists()
    from searchlab import config

    runs = mlflow_runs(config.default_tracking_uri(), "own-mlflow")
    (trial,) = [r for r in runs if "searchlab.trial" in r.data.tags]
    mine = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
    assert [r.data.params for r in mine] == [{"user_units": trial.data.params["units"]}]
    assert not any(k.startswith("opt_") for k in trial.data.params)
    assert mlflow_runs(config.default_tracking_uri(), "Default") == []  # not the checks' runs
