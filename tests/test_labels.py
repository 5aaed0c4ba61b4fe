"""Labels and objectives as users give them: one-hot, multi-label, float targets and several
outputs reach ``fit`` unchanged; the objective's direction is inferred from its name.

The training tests use real data: MNIST from the data directory, and scikit-learn's bundled
diabetes regression set (442 patients, 10 features, a float disease-progression target).
"""

from __future__ import annotations

import numpy as np
import pytest

from searchlab import Dataset, Study, StudyDefinitionError, data
from searchlab.errors import DataError
from searchlab.study import infer_direction


def mnist_arrays(n_train: int = 600, n_test: int = 200):
    loaded = data.load(Dataset("mnist"))
    return (
        loaded.x_train[:n_train],
        loaded.y_train[:n_train],
        loaded.x_test[:n_test],
        loaded.y_test[:n_test],
    )


def mnist_one_hot():
    """What KerasTuner's and Optuna's Keras examples feed: ``to_categorical`` labels."""
    import keras

    x, y, xt, yt = mnist_arrays()
    return x, keras.utils.to_categorical(y, 10), xt, keras.utils.to_categorical(yt, 10)


def diabetes():
    """scikit-learn's diabetes data, the target standardised (float, mostly within -2..2),
    the last 100 patients for validation."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    x, y = x.astype("float32"), y.astype("float32")
    return x[:-100], y[:-100], x[-100:], y[-100:]


def forget_cached_data():
    data.forget()


# -- labels reach fit as given --------------------------------------------------------


def test_one_hot_labels_from_a_loader_keep_their_shape(data_dir) -> None:
    loaded = data.load(Dataset(loader=mnist_one_hot))
    assert loaded.y_train.shape == (600, 10) and loaded.y_val.shape == (200, 10)
    given = mnist_one_hot()[1]
    assert loaded.y_train.dtype == given.dtype and loaded.num_classes == 10
    np.testing.assert_array_equal(loaded.y_train, given)


def test_float_regression_targets_are_not_truncated() -> None:
    loaded = data.load(Dataset(loader=diabetes))
    assert loaded.y_train.dtype == np.float32
    np.testing.assert_array_equal(loaded.y_train, diabetes()[1])
    assert np.abs(loaded.y_train).mean() > 0.5  # cast to int, most would be 0
    assert loaded.num_classes is None


def test_named_datasets_keep_int_ids_and_one_hot_on_request(data_dir) -> None:
    ids = data.load(Dataset("mnist", subset={"train": 50, "val": 20}))
    assert ids.y_train.shape == (50,) and ids.y_train.dtype.kind == "i" and ids.num_classes == 10
    hot = data.load(Dataset("mnist", subset={"train": 50, "val": 20}, one_hot=True))
    assert hot.y_train.shape == (50, 10) and hot.num_classes == 10
    np.testing.assert_array_equal(hot.y_train.argmax(axis=1), ids.y_train)
    np.testing.assert_array_equal(hot.y_val.sum(axis=1), np.ones(20))
    two = data.load(Dataset("mnist", subset=40, classes=(3, 7), one_hot=True))
    assert two.y_train.shape[1] == 2 and two.num_classes == 2


def test_multi_label_and_several_outputs_pass_through() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((30, 4), dtype=np.float32)
    tags = (rng.random((30, 5)) > 0.5).astype("float32")  # multi-label rows
    targets = {"kind": rng.integers(0, 3, 30), "size": rng.random((30, 2))}

    multi = data.load(Dataset(loader=lambda: (x[:20], tags[:20], x[20:], tags[20:]), subset=8))
    assert multi.y_train.shape == (8, 5) and multi.num_classes == 5

    def outputs():
        first = {k: v[:20] for k, v in targets.items()}
        return x[:20], first, x[20:], {k: v[20:] for k, v in targets.items()}

    several = data.load(Dataset(loader=outputs, validation=0.25))
    assert set(several.y_train) == {"kind", "size"} and several.num_classes is None
    assert several.y_train["size"].shape == (15, 2) and several.y_val["kind"].shape == (5,)
    np.testing.assert_array_equal(several.y_val["size"], targets["size"][15:20])
    as_list = data.load(Dataset(loader=lambda: (x, [tags, tags[:, 0]], x, [tags, tags[:, 0]])))
    assert isinstance(as_list.y_train, list) and as_list.y_train[1].shape == (30,)


def test_label_mistakes_are_one_line() -> None:
    x = np.zeros((10, 3), dtype="float32")
    with pytest.raises(DataError, match="gives 10 train inputs but labels with 9 rows"):
        data.load(Dataset(loader=lambda: (x, np.zeros(9), x, np.zeros(10))))
    with pytest.raises(DataError, match="one_hot=True turns int class ids"):
        data.load(Dataset(loader=lambda: (x, np.zeros(10) + 0.5, x, np.zeros(10)), one_hot=True))


# -- the objective's direction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "direction"),
    [
        ("val_loss", "minimize"),
        ("loss", "minimize"),
        ("val_mean_absolute_error", "minimize"),
        ("val_mae", "minimize"),
        ("mse", "minimize"),
        ("val_root_mean_squared_error", "minimize"),
        ("val_categorical_crossentropy", "minimize"),
        ("out_a_loss", "minimize"),
        ("val_accuracy", "maximize"),
        ("val_acc", "maximize"),
        ("val_sparse_top_k_categorical_accuracy", "maximize"),
        ("val_auc_1", "maximize"),
        ("val_precision", "maximize"),
        ("recall", "maximize"),
        ("val_false_negatives", "minimize"),
        ("my_metric", None),
        ("val_cosine_similarity", None),
    ],
)
def test_direction_is_inferred_from_the_metric_name(objective: str, direction) -> None:
    assert infer_direction(objective) == direction


def _study(**kw):
    return Study(name="s", space={}, model=lambda p: None, data=Dataset(loader=diabetes), **kw)


def test_study_infers_the_direction_and_an_explicit_one_wins() -> None:
    study = _study(objective="val_loss")
    assert study.direction == "minimize" and study.direction_source == "inferred from its name"
    assert _study(objective="val_loss", direction="max").direction == "maximize"
    assert _study(objective="val_accuracy").direction == "maximize"
    with pytest.raises(StudyDefinitionError, match="add direction='maximize' or direction="):
        _study(objective="my_metric")


def test_keras_tuner_objectives_are_accepted_and_lists_refused() -> None:
    kt = pytest.importorskip("keras_tuner")
    study = _study(objective=kt.Objective("val_mae", direction="min"))
    assert (study.objective, study.direction) == ("val_mae", "minimize")
    custom = _study(objective=kt.Objective("my_metric", direction="max"))
    assert (custom.objective, custom.direction) == ("my_metric", "maximize")
    with pytest.raises(StudyDefinitionError, match="disagree"):
        _study(objective=kt.Objective("val_mae", direction="min"), direction="maximize")
    with pytest.raises(StudyDefinitionError, match="lists 2 objectives .*searchlab optimises one"):
        _study(objective=["val_loss", kt.Objective("val_accuracy", "max")])


# -- training: real studies ------------------------------------------------------------

ONE_HOT_STUDY = """
import os
import keras
import numpy as np
from searchlab import Choice, Dataset, Study


def mnist_one_hot():
    with np.load(os.path.join(os.environ["SEARCHLAB_DATA_DIR"], "mnist.npz")) as f:
        x, y = f["x_train"][:600] / 255.0, f["y_train"][:600]
        xt, yt = f["x_test"][:200] / 255.0, f["y_test"][:200]
    return x, keras.utils.to_categorical(y, 10), xt, keras.utils.to_categorical(yt, 10)


def build(params, info):
    model = keras.Sequential([
        keras.Input(info.input_shape), keras.layers.Flatten(),
        keras.layers.Dense(params["units"], activation="relu"),
        keras.layers.Dense(info.num_classes, activation="softmax"),
    ])
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(name="one-hot", space={"units": Choice([16, 32])}, model=build,
              data=Dataset(loader=mnist_one_hot), objective="val_accuracy",
              strategy="grid", epochs=2, batch_size=64)
"""


@pytest.mark.slow
def test_one_hot_mnist_with_categorical_crossentropy(cli, project) -> None:
    (project / "onehot.py").write_text(ONE_HOT_STUDY)
    result = cli("run", "onehot.py", "--in-process")
    assert result.exit_code == 0, result.output
    assert result.output.count("complete: val_accuracy=") == 2, result.output
    from searchlab import config
    from tests.conftest import mlflow_runs

    trials = [
        r
        for r in mlflow_runs(config.default_tracking_uri(), "one-hot")
        if "searchlab.trial" in r.data.tags
    ]
    assert all(r.data.tags["searchlab.num_classes"] == "10" for r in trials)
    assert all(r.data.metrics["objective"] > 0.3 for r in trials), result.output  # chance: 0.1


REGRESSION_STUDY = """
import numpy as np
import keras
from sklearn.datasets import load_diabetes
from searchlab import Choice, Dataset, Study


def diabetes():
    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    x, y = x.astype("float32"), y.astype("float32")
    return x[:-100], y[:-100], x[-100:], y[-100:]


def build(params, info):
    assert info.num_classes is None
    model = keras.Sequential([
        keras.Input(info.input_shape),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(keras.optimizers.Adam(params["learning_rate"]), "mse",
                  metrics=["mean_absolute_error"])
    return model


study = Study(name="diabetes", space={"learning_rate": Choice([1e-4, 3e-3, 3e-2])}, model=build,
              data=Dataset(loader=diabetes), objective="{objective}",
              strategy="grid", epochs=3, batch_size=32)
"""


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["val_loss", "val_mean_absolute_error"])
def test_regression_minimises_and_the_best_trial_has_the_lowest_loss(
    cli, project, objective
) -> None:
    (project / "diabetes.py").write_text(REGRESSION_STUDY.replace("{objective}", objective))
    result = cli("run", "diabetes.py", "--in-process", "--subset", "300")
    assert result.exit_code == 0, result.output
    assert f"objective {objective} (minimize, inferred from its name)" in result.output
    from searchlab import config
    from searchlab.tracking import client
    from tests.conftest import mlflow_runs

    runs = mlflow_runs(config.default_tracking_uri(), "diabetes")
    parent = next(r for r in runs if r.data.tags.get("searchlab.role") == "session")
    trials = [r for r in runs if "searchlab.trial" in r.data.tags]
    c = client(config.default_tracking_uri())
    lowest = {}
    for run in trials:
        history = [m.value for m in c.get_metric_history(run.info.run_id, objective)]
        assert run.data.metrics["objective"] == pytest.approx(min(history))  # its best epoch
        lowest[run.data.tags["searchlab.trial"]] = min(history)
    best = min(lowest, key=lowest.get)
    assert str(int(parent.data.metrics["best_trial"])) == best
    assert parent.data.metrics["best_value"] == pytest.approx(lowest[best])
    assert parent.data.tags["searchlab.direction"] == "minimize"


def _plain_keras_history(build, loaded, seed: int, epochs: int, batch_size: int) -> dict:
    """The same configuration in plain Keras: seed, build, ``model.fit``."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build({}, data.info_of(loaded))
    history = model.fit(
        loaded.x_train,
        loaded.y_train,
        validation_data=(loaded.x_val, loaded.y_val),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
    )
    return history.history


def _one_hot_model(params, info):
    import keras

    model = keras.Sequential(
        [
            keras.Input(info.input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(info.num_classes, activation="softmax"),
        ]
    )
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
    return model


def _regression_model(params, info):
    import keras

    model = keras.Sequential(
        [
            keras.Input(info.input_shape),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "mse", metrics=["mean_absolute_error"])
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loader", "build", "objective"),
    [(mnist_one_hot, _one_hot_model, "val_accuracy"), (diabetes, _regression_model, "val_loss")],
    ids=["one-hot", "regression"],
)
def test_a_trial_reaches_the_numbers_of_plain_keras(data_dir, tmp_path, loader, build, objective):
    from searchlab.training import TrialSpec, run_trial, trial_seed

    loaded = data.load(Dataset(loader=loader))
    spec = TrialSpec(build=build, data=loaded, epochs=3, objective=objective, batch_size=32, seed=7)
    seen: dict[int, dict[str, float]] = {}
    result = run_trial(4, {}, spec, tmp_path, lambda epoch, logs: seen.setdefault(epoch, logs))
    assert result.error is None and sorted(seen) == [0, 1, 2]
    plain = _plain_keras_history(build, loaded, trial_seed(7, 4), epochs=3, batch_size=32)
    for name, values in plain.items():
        ours = [seen[epoch][name] for epoch in range(3)]
        np.testing.assert_allclose(ours, values, rtol=1e-6, err_msg=name)
        print(f"{loader.__name__} {name}: searchlab {ours} plain Keras {values}")
