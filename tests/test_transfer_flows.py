"""Transfer from a model of your own: the flows users have written by hand for years.

A small CNN is trained on MNIST digits 0-4 and saved as ``.h5``; it is then the backbone of a
search on digits 5-9 (200 training images), which must beat the same head (Dense -> Dropout ->
Dense) trained from scratch on the raw pixels.  Also: fine-tune a saved model on new
data, freeze all but its last N layers, save the result and load it back with plain Keras.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import Choice, Dataset, Float, Study, engines, runner
from searchlab.data import info_of, load
from searchlab.models import Transfer, dense_classifier
from searchlab.outcome import TrialState
from searchlab.tracking import MlflowTracker
from searchlab.training import TrialSpec, cache, load_trained, run_trial
from tests.conftest import mlflow_runs

pytestmark = pytest.mark.slow

LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Reshape((28, 28, 1), name="channels"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(64, activation="relu", name="features"),
            keras.layers.Dense(5, activation="softmax", name="digits"),
        ],
        name="mnist_low",
    )


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, data_dir: Path) -> dict[str, Path]:
    """``low.h5``: the CNN trained on digits 0-4 (about 98% on them)."""
    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    low = load(Dataset("mnist", classes=LOW, subset=20000), data_dir)
    model = _cnn()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(low.x_train, low.y_train, epochs=2, batch_size=128, verbose=0)
    model.save(folder / "low.h5")
    return {"low": folder / "low.h5"}


class _Silent:
    def started(self, *args):
        pass

    def trial_started(self, *args):
        pass

    def epoch(self, *args):
        pass

    def trial_finished(self, *args):
        pass

    def finished(self, *args):
        pass


def _search(name: str, space: dict, model, project: Path) -> dict:
    study = Study(
        name=name,
        space=space,
        model=model,
        data=Dataset("mnist", classes=HIGH, subset={"train": 200, "val": 600}),
        strategy="grid",
        trials=None,
        epochs=10,
        seed=0,
    )
    options = engines.RunOptions(
        strategy="grid",
        trials=None,
        timeout=None,
        epochs=10,
        seed=0,
        storage=f"sqlite:///{project / 'optuna.db'}",
    )
    tracker = MlflowTracker(f"sqlite:///{project / 'mlflow.db'}", project / "mlartifacts")
    summary = runner.run(study, options, tracker, _Silent())
    runs = [
        r for r in mlflow_runs(tracker.uri, name) if r.data.tags.get("searchlab.role") != "session"
    ]
    assert summary["n_complete"] == len(runs) == study.search_space.grid_size()
    return {"summary": summary, "runs": runs}


def test_a_model_trained_on_digits_0_to_4_transfers_to_digits_5_to_9(project, saved_models):
    learning_rate = Float(1e-3, 3e-3, log=True, grid=[1e-3, 3e-3])
    # Frozen up to conv2 (4) or pool2 (5): both cut after `flat`, so they share the cache.
    transfer = _search(
        "transfer-low-high",
        {
            "frozen_layers": Choice([4, 5]),
            "head_width": Choice([64]),
            "learning_rate": Choice([3e-3]),
        },
        Transfer(str(saved_models["low"])),
        project,
    )
    head_only = _search(  # the same head on raw pixels: Flatten -> Dense(64) -> Dense(5)
        "head-from-scratch",
        {"layers": Choice([1]), "units": Choice([64]), "learning_rate": learning_rate},
        dense_classifier,
        project,
    )
    best_transfer = transfer["summary"]["best_value"]
    best_scratch = head_only["summary"]["best_value"]
    assert best_transfer >= best_scratch + 0.03, (best_transfer, best_scratch)
    # Every transfer trial ran on the feature cache, computed once, and says so in MLflow.
    sources = sorted(r.data.tags["searchlab.cache_phases"] for r in transfer["runs"])
    assert sources == ["flat:computed", "flat:memory"], sources
    assert {r.data.tags["searchlab.cache_layer"] for r in transfer["runs"]} == {"flat"}
    # a model that freezes nothing says so (the automatic cache's reason), as every trial does
    assert {r.data.tags["searchlab.cache"] for r in head_only["runs"]} == {"off"}
    assert all(
        r.data.tags["searchlab.cache.reason"].startswith(cache.Reason.NO_FROZEN.value)
        for r in head_only["runs"]
    )


def test_fine_tune_a_saved_model_freeze_all_but_the_last_layers_save_and_reload(
    project, saved_models, data_dir
):
    new = load(Dataset("mnist", classes=HIGH, subset={"train": 200, "val": 200}), data_dir)
    original = keras.models.load_model(saved_models["low"], compile=False)
    # Keep the last 2 backbone layers (flat, features) trainable: freeze the first 5 of 7.
    build = Transfer(str(saved_models["low"]))
    params = {"frozen_layers": 5, "head_width": 16, "learning_rate": 3e-3}
    result = run_trial(
        0, params, TrialSpec(build=build, data=new, epochs=2, seed=0), project / "trial"
    )
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache_layer"] == "flat"  # flat has no weights: still frozen
    tuned = load_trained(build, params, info_of(new), result.weights_path)
    for name in ("conv1", "conv2"):  # frozen: exactly the saved weights
        for a, b in zip(
            tuned.get_layer(name).get_weights(), original.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    changed = (
        tuned.get_layer("features").get_weights()[0]
        - original.get_layer("features").get_weights()[0]
    )
    assert np.abs(changed).max() > 0  # fine-tuned on the new digits
    accuracy = float(np.mean(tuned.predict(new.x_val, verbose=0).argmax(1) == new.y_val))
    assert accuracy == pytest.approx(result.value, abs=1e-6)
    # Save and reload with plain Keras: the same predictions, and it fine-tunes again.
    path = project / "tuned.h5"
    tuned.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        reloaded.predict(new.x_val, verbose=0),
        tuned.predict(new.x_val, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    again = Transfer(str(path), cut="head_dense")
    model = again({"frozen_layers": 8}, info_of(new))
    backbone = Transfer.backbone_layers(model)
    assert [layer.name for layer in backbone][-2:] == ["head_pool", "head_dense"]
    assert [layer.trainable for layer in backbone][-2:] == [False, True]
    assert model.get_layer("head_dense_1").trainable  # the new head got fresh names
