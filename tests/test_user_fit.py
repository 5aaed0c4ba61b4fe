"""A HyperModel's own ``fit`` as users write it: two ``model.fit`` calls (head, then the
whole model), ``hp.Fixed`` values, a returned number and no objective (keras-io's
``HyperRegressor``), ``print`` inside fit, and a model that freezes nothing."""

from __future__ import annotations

import types

import keras
import keras_tuner
import numpy as np
import optuna
import pytest
from keras import layers
from test_user_code import _history, _runs, write

from searchlab import Study, StudyDefinitionError
from searchlab.hp import UNNAMED_OBJECTIVE, HpSpace
from searchlab.training import Monitor, TrialSpec
from searchlab.training.userfit import _returned_metrics


class HyperRegressor(keras_tuner.HyperModel):
    """keras-io's guides/keras_tuner/getting_started.py, "Custom evaluation": fit returns
    the validation MAE, a single float to minimise; no objective is given."""

    def build(self, hp):
        model = keras.Sequential(
            [
                layers.Dense(units=hp.Int("units", 32, 128, 32), activation="relu"),
                layers.Dense(units=1),
            ]
        )
        model.compile(optimizer="adam", loss="mean_squared_error")
        return model

    def fit(self, hp, model, x, y, validation_data, **kwargs):
        print("HyperRegressor.fit runs")
        model.fit(x, y, **kwargs)
        x_val, y_val = validation_data
        y_pred = model.predict(x_val)
        # Return a single float to minimize.
        return np.mean(np.abs(y_pred - y_val))


class HistoryModel(HyperRegressor):
    def fit(self, hp, model, *args, **kwargs):
        return model.fit(*args, **kwargs)


def test_a_fit_that_returns_a_number_and_no_objective_is_minimised() -> None:
    study = Study(name="regressor", space=None, model=HyperRegressor(), data="mnist")
    assert (study.objective, study.goal) == ("default_objective", "minimize")
    assert "KerasTuner" in study.direction_source
    # a fit that returns model.fit's History keeps the default metric
    other = Study(name="history", space=None, model=HistoryModel(), data="mnist")
    assert (other.objective, other.goal) == ("val_accuracy", "maximize")


def test_the_users_prints_in_fit_do_not_run_before_a_trial(capsys) -> None:
    study = Study(name="regressor", space=None, model=HyperRegressor(), data="mnist")
    study.search_space.suggest(optuna.create_study().ask())  # fit runs dry, as at each trial
    assert study.search_space.names == ["units"]
    assert "HyperRegressor.fit runs" not in capsys.readouterr().out


def test_a_number_returned_under_an_unnamed_objective_is_refused() -> None:
    # where the dry run could not tell what fit returns, a trial still never maximises it
    spec = TrialSpec(build=None, data=None, epochs=1, objective=UNNAMED_OBJECTIVE)  # type: ignore[arg-type]
    with pytest.raises(StudyDefinitionError, match="direction='minimize'"):
        _returned_metrics(np.float32(0.3), spec, Monitor(spec, None))


def test_fixed_values_are_the_trials_params_but_not_searched() -> None:
    def build_model(hp):
        hp.Fixed("head_lr", 0.01)
        hp.Int("units", 8, 16, step=8)
        assert hp.get("head_lr") == 0.01  # KerasTuner's hp.get reads a fixed value
        return "a model"

    space = HpSpace(build_model)
    trial = optuna.create_study().ask()
    assert space.suggest(trial) == {"head_lr": 0.01, "units": trial.params["units"]}
    assert set(trial.distributions) == {"units"}  # Optuna searches only units
    assert all(set(point) == {"units"} for point in space.grid())


def test_a_second_fit_counts_its_epochs_on() -> None:
    spec = TrialSpec(build=None, data=None, epochs=1, objective="val_loss", direction="minimize")  # type: ignore[arg-type]
    seen: list[int] = []
    monitor = Monitor(spec, lambda epoch, logs: seen.append(epoch))
    monitor.target = keras.Sequential([keras.Input((2,)), layers.Dense(1)])  # whose weights
    for loss in (0.5, 0.4):  # two model.fit calls of one epoch each: Keras says 0 twice
        monitor.on_train_begin()
        monitor.on_epoch_begin(0)
        monitor.on_epoch_end(0, {"loss": loss, "val_loss": loss})
    assert seen == [0, 1] and monitor.best_epoch == 2
    # searchlab's own phases pass initial_epoch: no offset on top
    seen.clear()
    monitor.on_train_begin()
    monitor.on_epoch_begin(2)
    monitor.on_epoch_end(2, {"loss": 0.3, "val_loss": 0.3})
    assert seen == [2]


def test_a_hypermodel_fit_on_a_model_that_freezes_nothing_has_no_cache_warning() -> None:
    from searchlab.data import DataInfo
    from searchlab.outcome import cache_off_by_choice
    from searchlab.training.plans import AutoPlan

    spec = types.SimpleNamespace(cache=True, fit=print, epochs=1, backbone_seed=None)
    info = DataInfo(input_shape=(4,), num_classes=2)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3), layers.Dense(2)])
    plan = AutoPlan(model, spec, info)  # type: ignore[arg-type]
    assert cache_off_by_choice(plan.tags["searchlab.cache.reason"])
    model.layers[0].trainable = False
    frozen = AutoPlan(model, spec, info)  # type: ignore[arg-type]
    assert not cache_off_by_choice(frozen.tags["searchlab.cache.reason"])


TWO_FITS = """
import keras
import keras_tuner
from keras import layers
from searchlab import Dataset, Study


class TwoFits(keras_tuner.HyperModel):
    def build(self, hp):
        hp.Fixed("head_epochs", 1)
        model = keras.Sequential([keras.Input((28, 28)), layers.Flatten(),
                                  layers.Dense(hp.Choice("units", [8, 16]), activation="relu"),
                                  layers.Dense(10, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        print("the user's fit runs")
        model.fit(*args, **kwargs)  # the head
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model.fit(*args, **kwargs)  # then all of it again


study = Study(name="two-fits", space=None, model=TwoFits(),
              data=Dataset("mnist", subset={"train": 200, "val": 50}),
              objective="val_accuracy", strategy="grid", trials=2, epochs=1, batch_size=64)
"""


@pytest.mark.slow
def test_a_fit_that_fits_twice_logs_each_epoch_once(cli, project) -> None:
    write(project, TWO_FITS)
    result = cli("run", "study.py", "--in-process")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("epoch 1 of 1:") == 2 and out.count("epoch 2:") == 2  # not "2 of 1"
    assert out.count("the user's fit runs") == 2  # in the trials only
    assert "head_epochs=1" in out and "feature cache is off" not in out
    _, trials = _runs("two-fits")
    assert len(trials) == 2
    for run in trials:
        assert run.data.params["head_epochs"] == "1"
        assert len(_history(run, "val_accuracy")) == 2  # steps 1 and 2
    stored = optuna.load_study(study_name="two-fits", storage=_storage(project)).trials
    assert all(set(t.params) == {"units"} for t in stored)


def _storage(project) -> str:
    from searchlab import config

    return config.default_storage()
