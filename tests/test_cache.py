"""The frozen-prefix feature cache: where a model may be cut, what is cached where, and that a
trial trained on the cache ends exactly where the same trial trained on raw images ends."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import cache
from searchlab.data import Data, Dataset, info_of, load
from searchlab.models import Transfer
from searchlab.trial import TrialSpec, TrialState, load_trained, run_trial


def _data(n_train: int = 40, n_val: int = 20, dim: int = 64, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    return Data(
        x_train=rng.normal(size=(n_train, dim)).astype("float32"),
        y_train=rng.integers(0, 3, n_train).astype("int32"),
        x_val=rng.normal(size=(n_val, dim)).astype("float32"),
        y_val=rng.integers(0, 3, n_val).astype("int32"),
        x_test=np.zeros((0, dim), "float32"),
        y_test=np.zeros((0,), "int32"),
        num_classes=3,
    )


def _frozen_mlp(width: int = 32, dim: int = 64, dropout_first: bool = False) -> keras.Model:
    inputs = keras.Input((dim,))
    x = keras.layers.Dropout(0.2, name="drop")(inputs) if dropout_first else inputs
    x = keras.layers.Dense(width, activation="relu", name="frozen", trainable=False)(x)
    x = keras.layers.Dense(16, activation="relu", name="train_me")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def test_cut_points_skip_the_inside_of_a_residual_block():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(8, name="a", trainable=False)(inputs)
    b = keras.layers.Dense(8, name="b", trainable=False)(a)
    c = keras.layers.Add(name="c")([a, b])  # a skips over b
    d = keras.layers.Dense(2, name="d")(c)
    model = keras.Model(inputs, d)
    names = [model.layers[i].name for i in cache.cut_points(model)]
    assert "b" not in names  # after b, a's output is still needed by c
    assert {"a", "c"} <= set(names)
    cut = cache.plan_cut(model, cache.cut_points(model))
    assert cut is not None and cut.name == "c"  # Add has no weights: still frozen


def test_plan_cut_stops_at_trainable_and_random_layers():
    model = _frozen_mlp()
    cut = cache.plan_cut(model, cache.cut_points(model))
    assert cut is not None and (cut.name, cut.shape) == ("frozen", (32,))
    model.get_layer("frozen").trainable = True
    assert cache.plan_cut(model, cache.cut_points(model)) is None
    augmented = _frozen_mlp(dropout_first=True)  # randomness before the frozen part
    assert cache.plan_cut(augmented, cache.cut_points(augmented)) is None


def test_features_come_from_memory_then_disk_and_the_disk_stays_bounded(tmp_path: Path):
    data = _data(n_train=100, n_val=50)
    model = _frozen_mlp(width=2048)
    cut = cache.plan_cut(model, cache.cut_points(model))
    store = cache.FeatureCache(root=tmp_path, memory_mb=64, disk_mb=2)  # 1.2 MB each
    first = store.features(model, cut, data)
    assert first.source is cache.Source.COMPUTED
    prefix = keras.Model(model.inputs, model.get_layer("frozen").output)
    np.testing.assert_allclose(first.x_val, prefix.predict(data.x_val, verbose=0), atol=1e-5)
    assert store.features(model, cut, data).source is cache.Source.MEMORY
    other_process = cache.FeatureCache(root=tmp_path, memory_mb=64, disk_mb=2)
    again = other_process.features(model, cut, data)
    assert again.source is cache.Source.DISK and again.key == first.key
    np.testing.assert_array_equal(again.x_train, first.x_train)
    # Other data gives another key; the disk bound evicts the older file.
    second = other_process.features(model, cut, _data(n_train=100, n_val=50, seed=1))
    assert second.key != first.key
    assert sorted(p.stem for p in tmp_path.glob("*.npz")) == [second.key]
    assert other_process.disk_usage() <= 2 << 20
    # Changing a frozen weight changes the key: stale features are never reused.
    w = model.get_layer("frozen").get_weights()
    model.get_layer("frozen").set_weights([w[0] * 2, w[1]])
    assert store.features(model, cut, data).source is cache.Source.COMPUTED


def test_features_larger_than_the_memory_bound_are_not_cached():
    data = _data(n_train=100, n_val=50)
    cut = cache.plan_cut(_frozen_mlp(width=2048), cache.cut_points(_frozen_mlp(width=2048)))
    assert not cache.FeatureCache(memory_mb=1, disk_mb=0).fits(cut, data)
    assert cache.FeatureCache(memory_mb=2, disk_mb=0).fits(cut, data)


@pytest.mark.slow
def test_a_trial_on_the_cache_ends_like_the_same_trial_without_it(
    project: Path, data_dir: Path
):
    """VGG16 (random weights), block5 and the head train: same seed, same metrics; the saved
    model is the complete one and predicts on raw images what the trial measured."""
    if not (data_dir / "cifar10_subset_small.npz").is_file():
        pytest.skip("no cifar10_subset_small.npz in the data directory")
    data = load(Dataset("cifar10", subset={"train": 64, "val": 32}, scale=False), data_dir)
    params = {"frozen_layers": 14, "head_width": 32, "dropout": 0.3, "learning_rate": 1e-3,
              "batch_size": 16}
    results = {}
    for use_cache in (True, False):
        build = Transfer("vgg16", weights=None, cache=use_cache)
        spec = TrialSpec(build=build, data=data, epochs=2, seed=7)
        results[use_cache] = run_trial(3, params, spec, project / f"t{use_cache}")
    on, off = results[True], results[False]
    assert on.state is off.state is TrialState.COMPLETE, (on.error, off.error)
    assert on.tags["searchlab.cache"] == "used" and on.tags["searchlab.cache_layer"] == "block4_pool"
    assert off.tags["searchlab.cache"] == "off"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(on.history[metric], off.history[metric], rtol=1e-4, atol=1e-5)
    assert on.best_epoch == off.best_epoch

    # The exported model takes raw images and holds the trained block5 + head.
    build = Transfer("vgg16", weights=None)
    full = load_trained(build, params, info_of(data), on.weights_path)
    probs = full.predict(data.x_val, verbose=0)
    accuracy = float(np.mean(probs.argmax(axis=1) == data.y_val))
    assert accuracy == pytest.approx(on.value, abs=1e-6)
    path = project / "best.h5"
    full.save(path)
    reloaded = keras.models.load_model(path)  # plain Keras, no custom objects
    np.testing.assert_allclose(reloaded.predict(data.x_val, verbose=0), probs, rtol=1e-4, atol=1e-6)
    reference = load_trained(build, params, info_of(data), off.weights_path)
    np.testing.assert_allclose(reference.predict(data.x_val, verbose=0), probs, rtol=1e-3, atol=1e-5)
