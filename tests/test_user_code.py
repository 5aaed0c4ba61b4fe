"""Users' own model code: KerasTuner's ``build_model(hp)`` and ``HyperModel`` (with its
``fit``), Optuna's ``create_model(trial)``, and what happens around a trial (the space read
without building models, one-line errors, the fail-fast stop, every command on every kind
of study).  Model code is written the way KerasTuner's and Optuna's guides write it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from searchlab import Study, StudyDefinitionError, load_study
from searchlab.errors import SpaceError
from searchlab.hp import HpSpace

# -- model code as the guides write it -------------------------------------------------

DEEP = """
import keras
from keras import layers
from searchlab import Dataset, Study


def build_model(hp):
    model = keras.Sequential([keras.Input(shape=(28, 28)), layers.Flatten()])
    for i in range(hp.Int("num_layers", 1, 20)):
        model.add(layers.Dense(units=hp.Int(f"units_{i}", 32, 512, step=32), activation="relu"))
    model.add(layers.Dense(10, activation="softmax"))
    model.compile(
        optimizer=keras.optimizers.Adam(hp.Choice("lr", [1e-3, 1e-4])),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


study = Study(name="deep", space=None, model=build_model, data="mnist", strategy="grid")
"""

# Optuna's Keras example style: create_model(trial) with the trial's suggest_* API.
OPTUNA_STYLE = """
import keras
from searchlab import Dataset, Study


def create_model(trial):
    n_layers = trial.suggest_int("n_layers", 1, 2)
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten()])
    for i in range(n_layers):
        num_hidden = trial.suggest_int(f"n_units_l{i}", 8, 64, log=True)
        model.add(keras.layers.Dense(num_hidden, activation="relu"))
        dropout = trial.suggest_float(f"dropout_l{i}", 0.0, 0.5)
        model.add(keras.layers.Dropout(rate=dropout))
    model.add(keras.layers.Dense(10, activation="softmax"))
    learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    optimizer = trial.suggest_categorical("optimizer", ["adam", "rmsprop"])
    opt = (keras.optimizers.Adam if optimizer == "adam" else keras.optimizers.RMSprop)(learning_rate)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=opt, metrics=["accuracy"])
    return model


study = Study(name="optuna-style", space=None, model=create_model,
              data=Dataset("mnist", subset={"train": 300, "val": 100}),
              strategy="random", trials=2, epochs=1, batch_size=64)
"""

OBJECTIVE = """
import keras
from searchlab import Study


def objective(trial):
    model = keras.Sequential([keras.layers.Dense(trial.suggest_int("units", 8, 32))])
    model.compile("adam", "mse")
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=2)
    return history.history["val_loss"][-1]


study = Study(name="objective", space=None, model=objective, data="mnist")
"""

# KerasTuner's "Tune model training" (getting started): fit searches shuffle and batch_size.
HYPERMODEL_FIT = """
import keras
import keras_tuner
from keras import layers
from searchlab import Dataset, Study


class MyHyperModel(keras_tuner.HyperModel):
    def build(self, hp):
        model = keras.Sequential([keras.Input((28, 28)), layers.Flatten()])
        model.add(layers.Dense(units=hp.Int("units", 16, 32, step=16), activation="relu"))
        model.add(layers.Dense(10, activation="softmax"))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        return model.fit(
            *args,
            shuffle=hp.Boolean("shuffle"),
            batch_size=hp.Choice("batch_size", [32, 64]),
            **kwargs,
        )


study = Study(name="hypermodel-fit", space=None, model=MyHyperModel(),
              data=Dataset("mnist", subset={"train": 300, "val": 100}),
              objective="val_accuracy", strategy="grid", trials=2, epochs=2)
"""

# KerasTuner's "Tune hyperparameters in your custom training loop": fit runs its own loop
# (and returns a dict here), the model is never compiled.
HYPERMODEL_LOOP = """
import keras
import keras_tuner
import numpy as np
import tensorflow as tf
from searchlab import Dataset, Study


class LoopHyperModel(keras_tuner.HyperModel):
    def build(self, hp):
        inputs = keras.Input((28, 28))
        x = keras.layers.Flatten()(inputs)
        x = keras.layers.Dense(hp.Choice("units", [16, 32]), activation="relu")(x)
        outputs = keras.layers.Dense(10)(x)
        return keras.Model(inputs, outputs)

    def fit(self, hp, model, x, y, validation_data, callbacks=None, **kwargs):
        batch_size = hp.Int("batch_size", 32, 64, step=32)
        optimizer = keras.optimizers.Adam(hp.Float("lr", 1e-3, 1e-2, sampling="log"))
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        for epoch in range(kwargs.get("epochs", 1)):
            for xb, yb in train:
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb, model(xb, training=True))
                grads = tape.gradient(loss, model.trainable_weights)
                optimizer.apply_gradients(zip(grads, model.trainable_weights))
        x_val, y_val = validation_data
        logits = model(x_val, training=False)
        val_loss = float(loss_fn(y_val, logits))
        val_acc = float(np.mean(np.argmax(logits, axis=-1) == y_val))
        return {"val_loss": val_loss, "val_accuracy": val_acc}


study = Study(name="hypermodel-loop", space=None, model=LoopHyperModel(),
              data=Dataset("mnist", subset={"train": 300, "val": 100}),
              objective="val_loss", strategy="random", trials=2, epochs=2)
"""

DECLARATIVE = """
from searchlab import Choice, Dataset, Study
from searchlab.models import dense_classifier

study = Study(name="declarative", space={"units": Choice([8, 16])}, model=dense_classifier,
              data=Dataset("mnist", subset={"train": 300, "val": 100}),
              strategy="grid", trials=1, epochs=1)
"""

BUILD_MODEL = """
import keras
from searchlab import Dataset, Study


def build_model(hp):
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                              keras.layers.Dense(hp.Choice("units", [8, 16]), activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(name="build-model", space=None, model=build_model,
              data=Dataset("mnist", subset={"train": 300, "val": 100}),
              strategy="grid", trials=1, epochs=1)
"""


def write(folder: Path, text: str, name: str = "study.py") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# -- the space, read without building models -------------------------------------------


def test_a_deep_grid_is_counted_without_building_a_model(tmp_path, monkeypatch) -> None:
    import keras

    def refuse(*args, **kwargs):
        raise AssertionError("a Keras layer was built to read the space")

    monkeypatch.setattr(keras.layers.Dense, "__init__", refuse)
    study = load_study(write(tmp_path, DEEP))
    assert study.search_space.names[:3] == ["num_layers", "units_0", "lr"]
    size = sum(2 * 16**k for k in range(1, 21))
    with pytest.raises(SpaceError, match=f"defines {size:,} grid points, more than grid search"):
        study.search_space.grid()


def test_code_that_decides_on_a_keras_value_is_called_for_real() -> None:
    import keras

    calls = []

    def build_model(hp):
        calls.append(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(hp.Int("units", 2, 3))])
        if model.count_params() > 12:  # a Keras value decides: a dry run cannot
            hp.Boolean("big")
        return model

    space = HpSpace(build_model)
    assert space.grid() == [{"units": 2}, {"units": 3, "big": False}, {"units": 3, "big": True}]
    assert calls  # called for real


def test_the_optuna_trial_api_declares_the_same_space() -> None:
    optuna_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def create_model(trial):
        trial.suggest_int("layers", 1, 3)
        trial.suggest_int("units", 8, 64, log=True)
        trial.suggest_float("dropout", 0.0, 0.5, step=0.25)
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("optimizer", ["adam", "sgd"])
        return trial.params

    space = HpSpace(create_model)
    trial = optuna_study.ask()
    params = space.suggest(trial)
    assert params == trial.params and set(params) == {
        "layers",
        "units",
        "dropout",
        "lr",
        "optimizer",
    }
    assert trial.distributions["units"] == optuna.distributions.IntDistribution(8, 64, log=True)
    assert trial.distributions["dropout"].step == 0.25
    assert space.describe()["lr"] == "float [0.0001, 0.01] log"
    with pytest.raises(SpaceError, match=r"hp.Float\('lr'"):
        space.grid()  # continuous: refused in one line with the fix
    assert space.builder({"layers": 2})["layers"] == 2  # replayed by the trial


def test_an_optuna_objective_is_refused_with_how_to_split_it(tmp_path) -> None:
    path = write(tmp_path, OBJECTIVE)
    with pytest.raises(StudyDefinitionError) as info:
        load_study(path)
    message = str(info.value)
    assert "as an Optuna objective(trial) does" in message
    assert "create_model(trial) that returns the compiled keras.Model" in message


def test_keras_tuner_tuner_arguments_name_the_alternative(tmp_path) -> None:
    text = OPTUNA_STYLE.replace("trials=2,", "max_trials=2,")
    with pytest.raises(StudyDefinitionError, match="'max_trials' .*use trials="):
        load_study(write(tmp_path, text))
    text = OPTUNA_STYLE.replace("trials=2,", "trials=2, overwrite=True,")
    with pytest.raises(StudyDefinitionError, match="'overwrite' .*a new name="):
        load_study(write(tmp_path, text))


def test_a_builder_that_fails_outside_a_trial_is_one_line(tmp_path) -> None:
    text = """
import keras
from searchlab import Study


def build_model(hp):
    base = keras.applications.MobileNetV2(weights="weights_not_here.h5", include_top=False)
    for layer in base.layers:  # a Keras value decides: the builder is called for real
        layer.trainable = hp.Boolean("train_" + layer.name)
    return base


study = Study(name="x", space=None, model=build_model, data="mnist")
"""
    study = load_study(write(tmp_path, text))
    with pytest.raises(StudyDefinitionError) as info:
        study.search_space.describe()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'study.py'}, line 7: build_model(hp) raised ValueError")
    assert "outside a trial" in message and "offline" in message and "\n" not in message


def test_hypermodels_are_read_with_their_fit(tmp_path, data_dir) -> None:
    study = load_study(write(tmp_path, HYPERMODEL_FIT))
    assert study.search_space.names == ["units", "shuffle", "batch_size"]
    assert study.fit is not None
    assert study.search_space.grid_size() == 2 * 2 * 2
    assert study.search_space.describe()["hypermodel"].endswith("MyHyperModel")
    loop = load_study(write(tmp_path, HYPERMODEL_LOOP, "loop.py"))
    assert loop.search_space.names == ["units", "batch_size", "lr"]
    with pytest.raises(StudyDefinitionError, match="is a class: pass an instance"):
        load_study(write(tmp_path, HYPERMODEL_FIT.replace("MyHyperModel(),", "MyHyperModel,")))


def test_hyperparameters_and_tune_new_entries_tailor_the_space(tmp_path) -> None:
    kt = pytest.importorskip("keras_tuner")
    hp = kt.HyperParameters()
    hp.Fixed("learning_rate", 1e-3)
    hp.Int("n_layers", 1, 2)

    def create_model(trial):
        trial.suggest_int("n_layers", 1, 5)
        trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("optimizer", ["adam", "sgd"])
        return trial.params

    def study(**kw):
        return Study(name="t", space=None, model=create_model, data="mnist", **kw)

    tailored = study(hyperparameters=hp)
    assert tailored.search_space.grid() == [
        {"n_layers": 1, "optimizer": "adam"},
        {"n_layers": 1, "optimizer": "sgd"},
        {"n_layers": 2, "optimizer": "adam"},
        {"n_layers": 2, "optimizer": "sgd"},
    ]
    assert tailored.model({"n_layers": 2})["learning_rate"] == 1e-3
    only = study(hyperparameters=hp, tune_new_entries=False)
    assert only.search_space.names == ["n_layers"]
    assert only.model({"n_layers": 2})["optimizer"] == "adam"  # not searched: its default
    closed = study(hyperparameters=hp, allow_new_entries=False)
    with pytest.raises(SpaceError, match="declares hyperparameter 'optimizer'.*allow_new_entries"):
        closed.search_space.describe()


def test_a_keras_2_model_is_refused_in_one_line() -> None:
    from searchlab.training import check_model

    legacy = type("Sequential", (), {"__module__": "tf_keras.src.engine.sequential"})
    with pytest.raises(StudyDefinitionError, match="Keras 2 model .*needs Keras 3"):
        check_model(legacy())


# -- before anything is recorded ---------------------------------------------------------


def _classifier(*layers):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(3, "softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_the_first_model_is_checked_by_one_eager_step() -> None:
    from searchlab.training import first_logs

    x, y = np.random.default_rng(0).random((8, 4), dtype="float32"), np.arange(8) % 3
    model = _classifier()
    logs = first_logs(model, x, y)
    assert model.run_eagerly  # nothing was traced
    expected = _classifier().evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert set(logs) == set(expected) == {"loss", "accuracy"}
    assert float(logs["loss"]) == pytest.approx(expected["loss"], rel=1e-5)


def test_a_model_that_only_runs_traced_is_checked_traced() -> None:
    import keras

    from searchlab.training import first_logs

    if keras.backend.backend() != "tensorflow":
        pytest.skip("a layer that tells eager from traced calls on TensorFlow")
    import tensorflow as tf

    class TracedOnly(keras.layers.Layer):
        def call(self, inputs):
            if tf.executing_eagerly():
                raise RuntimeError("this layer runs in a traced function only")
            return inputs

    x, y = np.random.default_rng(0).random((8, 4), dtype="float32"), np.arange(8) % 3
    model = _classifier(TracedOnly())
    logs = first_logs(model, x, y)
    assert not model.run_eagerly
    expected = _classifier(TracedOnly()).evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert float(logs["loss"]) == pytest.approx(expected["loss"], rel=1e-5)


def _refused_without_state(cli, project: Path, text: str) -> str:
    write(project, text)
    result = cli("run", "study.py", "--in-process")
    assert result.exit_code == 1, result.output
    assert not (project / ".searchlab" / "optuna.db").exists()
    assert not (project / ".searchlab" / "mlflow.db").exists()
    return result.output.strip()


@pytest.mark.slow
def test_an_objective_typo_leaves_no_state(cli, project) -> None:
    text = BUILD_MODEL.replace('strategy="grid"', 'objective="val_acc", strategy="grid"')
    text = text.replace("direction=None", "")
    output = _refused_without_state(
        cli, project, text.replace("trials=1,", 'trials=1, direction="max",')
    )
    assert output.startswith("error: The objective 'val_acc' is not a metric this model reports")
    assert "val_accuracy" in output and "\n" not in output


@pytest.mark.slow
def test_an_uncompiled_model_and_a_label_mismatch_leave_no_state(cli, project) -> None:
    uncompiled = BUILD_MODEL.replace(
        '    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])\n', ""
    )
    output = _refused_without_state(cli, project, uncompiled)
    assert output == (
        "error: The model builder returned a model that is not compiled: call "
        "model.compile(optimizer=..., loss=..., metrics=['accuracy']) before returning it."
    )
    mismatch = BUILD_MODEL.replace(
        '"sparse_categorical_crossentropy"', '"categorical_crossentropy"'
    )
    output = _refused_without_state(cli, project, mismatch)
    assert output.endswith(
        "labels are int class ids but the loss is categorical_crossentropy: use "
        "sparse_categorical_crossentropy or Dataset(one_hot=True)."
    )


# -- trials of users' code ---------------------------------------------------------------


def _runs(name: str) -> tuple:
    from searchlab import config
    from tests.conftest import mlflow_runs

    runs = mlflow_runs(config.default_tracking_uri(), name)
    parent = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    trials = sorted(
        (r for r in runs if "searchlab.trial" in r.data.tags),
        key=lambda r: int(r.data.tags["searchlab.trial"]),
    )
    return parent, trials


def _history(run, key: str) -> list[float]:
    from searchlab import config
    from searchlab.tracking import client

    c = client(config.default_tracking_uri())
    return [
        m.value for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["optuna", "keras-tuner"])
def test_a_hypermodel_fit_searches_shuffle_and_batch_size(cli, project, engine) -> None:
    write(project, HYPERMODEL_FIT)
    result = cli("run", "study.py", "--engine", engine, "--in-process")
    assert result.exit_code == 0, result.output
    _, trials = _runs("hypermodel-fit")
    assert len(trials) == 2
    for run in trials:
        assert set(run.data.params) == {"units", "shuffle", "batch_size"}
        assert run.data.tags["searchlab.state"] == "complete"
        # fit passed searchlab's callbacks on: every epoch reported, best epoch kept
        history = _history(run, "val_accuracy")
        assert len(history) == 2 and run.data.metrics["objective"] == pytest.approx(max(history))
    export = cli("export", "study.py", "-o", "best.keras")
    assert export.exit_code == 0, export.output


@pytest.mark.slow
def test_the_batch_size_hypermodel_fit_chose_is_the_one_it_trained_with(project, data_dir) -> None:
    from searchlab.training import TrialSpec, run_trial

    study = load_study(write(project, HYPERMODEL_FIT))
    from searchlab import data

    spec = TrialSpec(
        build=study.model, data=data.load(study.dataset), epochs=1, fit=study.fit, batch_size=8
    )
    steps = []
    import keras

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)

    seen = {}
    params = {"units": 16, "shuffle": False, "batch_size": 64}
    original = study.fit

    def fit_with_counter(params, model, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], Steps()]
        return original(params, model, *args, **kwargs)

    import dataclasses

    spec = dataclasses.replace(spec, fit=fit_with_counter)
    result = run_trial(0, params, spec, project / "w", lambda e, logs: seen.setdefault(e, logs))
    assert result.error is None
    assert len(steps) == 300 // 64 + 1  # fit's own batch_size=64, not searchlab's 8


@pytest.mark.slow
def test_a_hypermodel_fit_with_its_own_loop_returns_a_dict(cli, project) -> None:
    write(project, HYPERMODEL_LOOP)
    result = cli("run", "study.py", "--in-process")
    assert result.exit_code == 0, result.output
    assert "objective val_loss (minimize, inferred from its name)" in result.output
    parent, trials = _runs("hypermodel-loop")
    assert [r.data.tags["searchlab.state"] for r in trials] == ["complete", "complete"]
    for run in trials:
        assert set(run.data.params) == {"units", "batch_size", "lr"}
        assert run.data.metrics["objective"] == pytest.approx(run.data.metrics["val_loss"])
        assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0
    best = min(trials, key=lambda r: r.data.metrics["objective"])
    assert parent[0].data.metrics["best_value"] == pytest.approx(best.data.metrics["objective"])
    export = cli("export", "study.py", "-o", "best.h5")  # an uncompiled model exports too
    assert export.exit_code == 0, export.output


@pytest.mark.slow
def test_executions_per_trial_logs_each_and_averages(cli, project) -> None:
    write(project, DECLARATIVE.replace("epochs=1)", "epochs=2, executions_per_trial=2)"))
    result = cli("run", "study.py", "--in-process")
    assert result.exit_code == 0, result.output
    _, (run,) = _runs("declarative")
    first = _history(run, "execution_1/val_accuracy")
    second = _history(run, "execution_2/val_accuracy")
    assert len(first) == len(second) == 2 and first != second  # two fits, other seeds
    assert _history(run, "val_accuracy") == pytest.approx(
        [(a + b) / 2 for a, b in zip(first, second, strict=True)]
    )
    assert run.data.metrics["objective"] == pytest.approx((max(first) + max(second)) / 2)
    assert run.data.tags["searchlab.executions"] == "2"
    best = int(run.data.tags["searchlab.best_execution"])
    assert max((first, second)[best - 1]) == max(max(first), max(second))
    # the flag overrides the study
    again = cli("run", "study.py", "--in-process", "--executions-per-trial", "3", "--trials", "2")
    assert again.exit_code == 0, again.output
    _, runs = _runs("declarative")
    assert runs[1].data.tags["searchlab.executions"] == "3"


@pytest.mark.slow
def test_an_optuna_style_create_model_runs_unchanged(cli, project) -> None:
    write(project, OPTUNA_STYLE)
    result = cli("run", "study.py", "--in-process")
    assert result.exit_code == 0, result.output
    _, trials = _runs("optuna-style")
    assert [r.data.tags["searchlab.state"] for r in trials] == ["complete", "complete"]
    for run in trials:
        layers = int(run.data.params["n_layers"])
        expected = {"n_layers", "learning_rate", "optimizer"}
        expected |= {f"{p}_l{i}" for i in range(layers) for p in ("n_units", "dropout")}
        assert set(run.data.params) == expected


# An uncompiled model trained through HyperModel.fit's model.fit: searchlab cannot see it
# before the first step, so the first two trials fail the same way and the study stops.
UNCOMPILED_FIT = HYPERMODEL_FIT.replace(
    """        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
""",
    "",
).replace('strategy="grid", trials=2', 'strategy="random", trials=6')


@pytest.mark.slow
def test_the_first_trials_failing_alike_stop_the_study_at_the_second(cli, project) -> None:
    write(project, UNCOMPILED_FIT)
    result = cli("run", "study.py", "--in-process", "--max-failures", "5")
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: Stopped: trials 0 and 1 failed the same way before their first")
    assert "likely fix: the model is not compiled: call model.compile(" in last
    _, trials = _runs("hypermodel-fit")
    assert len(trials) == 2
    assert all("model.compile" in r.data.tags["searchlab.hint"] for r in trials)


KINDS = {
    "declarative": DECLARATIVE,
    "build_model": BUILD_MODEL,
    "hypermodel": HYPERMODEL_FIT.replace("trials=2, epochs=2", "trials=1, epochs=1"),
    "optuna-style": OPTUNA_STYLE.replace("trials=2", "trials=1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_command_works_on_every_kind_of_study(cli, project, kind) -> None:
    from searchlab import config
    from searchlab.cli import _compare_page, _tracker

    write(project, KINDS[kind])
    name = load_study(project / "study.py").name
    run = cli("run", "study.py")  # in a worker process, as by default
    assert run.exit_code == 0, run.output
    assert "complete:" in run.output
    for command in (("export", "study.py", "-o", "best.keras"), ("report", "study.py")):
        result = cli(*command)
        assert result.exit_code == 0, (command, result.output)
    doctor = cli("doctor", "study.py")
    assert f"ok    study           {name} from study.py" in doctor.output, doctor.output
    # searchlab ui: the page it opens (its server is MLflow's own, tested in test_report)
    page = _compare_page(_tracker(config.default_tracking_uri()), "study.py")
    assert f"(experiment {name!r})" in page
    import keras

    model = keras.models.load_model(project / "best.keras")
    assert model.predict(np.zeros((2, 28, 28), dtype="float32"), verbose=0).shape == (2, 10)


def test_a_study_file_importing_tf_keras_is_told_keras_3_is_needed(tmp_path) -> None:
    path = write(tmp_path, "import tf_keras\n" + BUILD_MODEL)
    try:
        import tf_keras  # noqa: F401
    except ImportError:
        with pytest.raises(
            StudyDefinitionError, match="line 1: it imports tf_keras .*needs Keras 3"
        ):
            load_study(path)
    else:  # installed: its models are refused when built (test_a_keras_2_model_is_refused...)
        pytest.skip("tf_keras is installed")
