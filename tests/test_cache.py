"""The frozen-prefix feature cache: where a model may be cut, what is cached where, and that a
trial trained on the cache ends exactly where the same trial trained on raw images ends."""

from __future__ import annotations

import json
import random
from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import backend
from searchlab.data import Data, Dataset, info_of, load
from searchlab.errors import StudyDefinitionError, TrialPruned
from searchlab.models import FineTune, Transfer
from searchlab.models import transfer as transfer_mod
from searchlab.outcome import TrialState
from searchlab.training import TrialSpec, cache, load_trained, run_trial


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


def test_the_prefix_fingerprint_covers_every_bit_of_the_weights_and_the_configs():
    """The next trial's backbone is compared with the last one hashed, not hashed again: the
    same fingerprint as hashing it, and any other bits (one value, 0.0 -> -0.0) or config
    give another."""
    keras.backend.clear_session()  # layer names from 0: as in each trial
    model = _frozen_mlp()
    cut = cache.plan_cut(model, cache.cut_points(model))
    assert cut is not None

    def fresh() -> str:  # hashed, not compared with the last weights hashed
        cache.POOLS.last_weights.clear()
        return cache.prefix_fingerprint(model, cut)

    first = fresh()
    keras.backend.clear_session()  # as between trials: the same layer names
    again = _frozen_mlp()  # another model, the same weights
    again.set_weights(model.get_weights())
    assert cache.prefix_fingerprint(again, cut) == first
    assert cache.POOLS.last_weights  # TensorFlow's and JAX's arrays are copies or read-only
    kernel, bias = model.get_layer("frozen").get_weights()
    one_bit, sign = kernel.copy(), kernel.copy()
    one_bit.flat[5] = np.nextafter(one_bit.flat[5], np.float32(1))
    sign.flat[7] = np.float32(0.0)
    seen = {first}
    for values in (one_bit, sign):
        model.get_layer("frozen").set_weights([values, bias])
        compared = cache.prefix_fingerprint(model, cut)
        assert compared == fresh() and compared not in seen
        seen.add(compared)
    negative = sign.copy()
    negative.flat[7] = np.float32(-0.0)
    model.get_layer("frozen").set_weights([negative, bias])
    assert cache.prefix_fingerprint(model, cut) not in seen
    model.get_layer("frozen").set_weights([kernel, bias])
    assert cache.prefix_fingerprint(model, cut) == first
    wider = _frozen_mlp(width=33)  # another config: another fingerprint
    assert cache.prefix_fingerprint(wider, cache.plan_cut(wider, cache.cut_points(wider))) != first


def test_a_hash_of_writable_views_is_not_remembered():
    """A torch parameter's NumPy view changes when it trains: its bits are hashed each time."""
    values = np.arange(6, dtype="float32")
    foreign = np.frombuffer(bytearray(values.tobytes()), dtype="float32")  # not NumPy's
    cache.weights_hash([foreign.reshape(-1)])
    assert not cache.POOLS.last_weights
    cache.weights_hash([values.copy().reshape(2, 3).reshape(-1)])  # a view of a copy
    assert cache.POOLS.last_weights
    read_only = foreign.copy()
    read_only.flags.writeable = False
    cache.POOLS.last_weights.clear()
    cache.weights_hash([read_only])
    assert cache.POOLS.last_weights


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


def test_workers_that_need_the_same_features_at_once_compute_them_once(
    tmp_path: Path, monkeypatch, caplog
):
    """Two workers of one machine (two caches on one folder; here two threads: a ``flock`` is
    held per open file) need the same features at once: one computes them while the other
    waits for its lock, says so, and reads them from disk."""
    import threading
    import time

    data = _data(n_train=100, n_val=50)
    model = _frozen_mlp()
    cut = cache.plan_cut(model, cache.cut_points(model))
    real, computing = backend.predict_arrays, threading.Event()
    callers: list[str] = []

    def slow(prefix, x, batch_size):  # long enough for the other worker to arrive
        callers.append(threading.current_thread().name)
        computing.set()
        time.sleep(0.5)
        return real(prefix, x, batch_size)

    monkeypatch.setattr(backend, "predict_arrays", slow)
    found: dict[str, cache.Features] = {}

    def worker(name: str) -> None:
        store = cache.FeatureCache(root=tmp_path, memory_mb=64, disk_mb=64)
        found[name] = store.features(model, cut, data)

    first = threading.Thread(target=worker, args=("first",), name="first")
    second = threading.Thread(target=worker, args=("second",), name="second")
    with caplog.at_level("INFO", logger="searchlab.cache"):
        first.start()
        assert computing.wait(10)
        second.start()
        first.join()
        second.join()
    assert callers == ["first", "first"]  # the training and the validation features, once
    assert (found["first"].source, found["second"].source) == (
        cache.Source.COMPUTED,
        cache.Source.DISK,
    )
    np.testing.assert_array_equal(found["second"].x_val, found["first"].x_val)
    assert "another searchlab process is computing cached features" in caplog.text


def test_features_larger_than_the_memory_bound_are_not_cached():
    data = _data(n_train=100, n_val=50)
    cut = cache.plan_cut(_frozen_mlp(width=2048), cache.cut_points(_frozen_mlp(width=2048)))
    assert not cache.FeatureCache(memory_mb=1, disk_mb=0).fits(cut, data)
    assert cache.FeatureCache(memory_mb=2, disk_mb=0).fits(cut, data)


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, matmul",
    [("sgd", True), ("adam", False)],
    ids=["sgd-matmul-convs", "adam-backend-convs"],
)
def test_a_trial_on_the_cache_ends_like_the_same_trial_without_it(
    project: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, matmul: bool
):
    """VGG16 (random weights), block5 and the head train: same seed, same metrics; the saved
    model is the complete one and predicts on raw images what the trial measured.

    With block5 trained as matrix products (MatmulConv2D, on a CPU) the gradients differ from
    the backend's convolution in float rounding only; SGD keeps them that close, while Adam
    divides each gradient by its own running size and so turns rounding noise on weights whose
    gradient is about zero into whole learning-rate steps (a few percent of val_loss after two
    epochs here).  So Adam is compared with the backend's convolutions on both paths."""
    if not (data_dir / "cifar10_subset_small.npz").is_file():
        pytest.skip("no cifar10_subset_small.npz in the data directory")
    if not matmul:
        monkeypatch.setattr(transfer_mod, "MATMUL_CONV_MAX_POSITIONS", 0)
    data = load(Dataset("cifar10", subset={"train": 64, "val": 32}, scale=False), data_dir)
    params = {
        "frozen_layers": 14,
        "head_width": 32,
        "dropout": 0.3,
        "learning_rate": 1e-3,
        "batch_size": 16,
    }
    results = {}
    for use_cache in (True, False):
        build = Transfer("vgg16", weights=None, cache=use_cache, optimizer=optimizer)
        spec = TrialSpec(build=build, data=data, epochs=2, seed=7)
        results[use_cache] = run_trial(3, params, spec, project / f"t{use_cache}")
    on, off = results[True], results[False]
    assert on.state is off.state is TrialState.COMPLETE, (on.error, off.error)
    assert (
        on.tags["searchlab.cache"] == "used" and on.tags["searchlab.cache_layer"] == "block4_pool"
    )
    assert off.tags["searchlab.cache"] == "off"
    # On a CPU block5's 2x2 convolutions train as matrix products (MatmulConv2D).
    if matmul:
        assert on.tags["searchlab.matmul_convs"] == "block5_conv1,block5_conv2,block5_conv3"
    else:
        assert "searchlab.matmul_convs" not in on.tags
    assert "searchlab.matmul_convs" not in off.tags
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(on.history[metric], off.history[metric], rtol=1e-5, atol=1e-6)
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
    np.testing.assert_allclose(
        reference.predict(data.x_val, verbose=0), probs, rtol=1e-3, atol=1e-5
    )


def _images(n_train: int = 24, n_val: int = 12, seed: int = 0) -> Data:
    """Random 32x32 RGB "images" in 0..255 with three classes (no data directory needed)."""
    rng = np.random.default_rng(seed)
    return Data(
        x_train=rng.uniform(0, 255, size=(n_train, 32, 32, 3)).astype("float32"),
        y_train=rng.integers(0, 3, n_train).astype("int32"),
        x_val=rng.uniform(0, 255, size=(n_val, 32, 32, 3)).astype("float32"),
        y_val=rng.integers(0, 3, n_val).astype("int32"),
        x_test=np.zeros((0, 32, 32, 3), "float32"),
        y_test=np.zeros((0,), "int32"),
        num_classes=3,
    )


def _accuracy(model: keras.Model, data: Data) -> float:
    return float(np.mean(model.predict(data.x_val, verbose=0).argmax(axis=1) == data.y_val))


@pytest.mark.slow
def test_a_cached_trial_saves_only_the_suffix_and_loads_as_the_complete_model(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Backbone frozen: the trial trains Dense -> Dropout -> Dense on cached features, never
    builds the complete VGG16 once the template exists, and its weights file holds the head
    and the prefix's fingerprint; the rebuilt complete model takes raw images."""
    data = _images()
    build = Transfer("vgg16", weights=None)
    params = {"frozen_layers": 18, "head_width": 16, "dropout": 0.2, "batch_size": 8}
    spec = TrialSpec(build=build, data=data, epochs=2, seed=3)
    first = run_trial(0, params, spec, project / "t0")
    assert first.state is TrialState.COMPLETE, first.error
    built = []
    original = Transfer.build_uncompiled
    monkeypatch.setattr(
        Transfer, "build_uncompiled", lambda self, *a: built.append(1) or original(self, *a)
    )
    result = run_trial(1, params, spec, project / "t1")
    assert result.state is TrialState.COMPLETE, result.error
    assert built == []  # the template of the first trial served the second
    assert result.tags["searchlab.cache_phases"] == "head_pool:memory"
    assert result.tags["searchlab.weights_form"] == "suffix"
    assert result.tags["searchlab.weights_prefix_layer"] == "head_pool"
    assert result.weights_path.name == "best.suffix.npz"
    assert result.weights_path.stat().st_size < 100_000  # not the 59 MB of VGG16
    with np.load(result.weights_path) as f:
        stored = {k for k in f.files if k != "meta"}
    assert len(stored) == 4  # head_dense and classes: kernel and bias each

    monkeypatch.setattr(Transfer, "build_uncompiled", original)
    full = load_trained(build, params, info_of(data), result.weights_path.parent)
    assert full.input_shape == (None, 32, 32, 3)
    assert _accuracy(full, data) == pytest.approx(result.value, abs=1e-6)
    path = project / "best.keras"
    full.save(path)
    np.testing.assert_allclose(
        keras.models.load_model(path, compile=False).predict(data.x_val, verbose=0),
        full.predict(data.x_val, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )

    # Another backbone (another seed): the fingerprint no longer matches, and it says so.
    with pytest.raises(StudyDefinitionError, match="fingerprint"):
        load_trained(
            Transfer("vgg16", weights=None, seed=1), params, info_of(data), result.weights_path
        )


@pytest.mark.slow
def test_an_uncached_trial_saves_the_complete_model(project: Path):
    data = _images(n_train=16, n_val=8)
    build = Transfer("vgg16", weights=None, cache=False)
    params = {"frozen_layers": 18, "head_width": 8, "batch_size": 8}
    result = run_trial(0, params, TrialSpec(build=build, data=data, epochs=1), project / "t")
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache"] == "off"
    assert result.tags["searchlab.weights_form"] == "full"
    assert result.weights_path.name == "best.weights.h5"
    full = load_trained(build, params, info_of(data), result.weights_path)
    assert _accuracy(full, data) == pytest.approx(result.value, abs=1e-6)


@pytest.mark.slow
def test_a_two_phase_trial_trains_the_suffix_of_its_shallower_cut(project: Path):
    """Head first (cut after head_pool), then block5 (cut after block4_pool): both phases
    train parts of one suffix model, which is what the weights file holds."""
    data = _images(n_train=16, n_val=8)
    build = Transfer("vgg16", weights=None, fine_tune=FineTune(head_epochs=1, epochs=1))
    params = {"frozen_layers": 14, "head_width": 8, "batch_size": 8}
    result = run_trial(0, params, TrialSpec(build=build, data=data, epochs=1), project / "t")
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache_phases"] == "head_pool:computed,block4_pool:computed"
    assert result.tags["searchlab.weights_prefix_layer"] == "block4_pool"
    with np.load(result.weights_path) as f:
        layers = [name for name, _ in json.loads(str(f["meta"]))["layers"]]
    assert layers[:3] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    full = load_trained(build, params, info_of(data), result.weights_path)
    assert _accuracy(full, data) == pytest.approx(result.value, abs=1e-6)


# -- one compiled suffix for many trials ---------------------------------------------------


def test_a_reset_suffix_starts_where_a_new_one_starts():
    """Every variable of a trained (here: NaN-filled) suffix -- block5's weights, the head's,
    the dropout's rate and seed stream -- is put back to a new suffix's, drawing the same seed
    from ``random``; the rate is no weight, so the weights still map onto the stock layers."""
    info = info_of(_images())
    build = Transfer("vgg16", weights=None)
    tpl = cache.template(build, info)
    cut = tpl.cut(build.freeze, 14)
    first = {"head_width": 8, "dropout": 0.0}
    second = {"head_width": 8, "dropout": 0.4}
    key = build.suffix_key(first, info, tpl.model, cut)
    assert key is not None and key == build.suffix_key(second, info, tpl.model, cut)
    assert key != build.suffix_key({"head_width": 16}, info, tpl.model, cut)

    keras.utils.set_random_seed(1)
    used = build.build_suffix(first, info, tpl.model, cut)
    for v in used.variables:
        v.assign(keras.ops.full(v.shape, np.nan if "float" in str(v.dtype) else 7, v.dtype))
    keras.utils.set_random_seed(2)
    build.reset_suffix(used, second, tpl.model)
    after_reset = random.random()
    keras.utils.set_random_seed(2)
    new = build.build_suffix(second, info, tpl.model, cut)
    assert random.random() == after_reset  # the head's seed is the one draw that matters
    assert len(used.variables) == len(new.variables)
    for a, b in zip(used.variables, new.variables, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path
        )
    dropout = new.get_layer("head_dropout")
    assert dropout.get_weights() == [] and dropout.rate == 0.4
    assert [layer.name for layer in used.layers if layer.weights] == [
        "block5_conv1",
        "block5_conv2",
        "block5_conv3",
        "head_dense",
        "classes",
    ]


class _PooledBuilder:
    """The builder side of the suffix pool: one suffix structure per ``params["i"]``."""

    def __init__(self) -> None:
        self.reset: list[int] = []

    def suffix_key(self, params, info, template, cut):
        return ("k", params["i"])

    def build_suffix(self, params, info, template, cut):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    def reset_suffix(self, model, params, template):
        self.reset.append(params["i"])


def test_the_pool_keeps_the_most_recently_used_suffixes(monkeypatch: pytest.MonkeyPatch):
    """A trial takes its structure's suffix out of the pool and gives it back when its fit
    ends: the pool then holds the SUFFIX_POOL_SIZE most recently used, and over its memory
    bound only the newest."""
    from types import SimpleNamespace

    build = _PooledBuilder()
    cut = SimpleNamespace(index=3)
    template = SimpleNamespace(model=None)
    plan = SimpleNamespace(cuts=[cut], base=cut, phases=[(0, 0, 1e-3)], template=template)

    def trial(i: int) -> cache.Suffix:  # one trial of structure i: take, train, give back
        suffix = cache.training_suffix(build, {"i": i}, None, plan)
        cache.keep_suffix(suffix)
        return suffix

    def pooled() -> list[int]:
        return [key[0][1] for key in cache.POOLS.suffixes]

    cache.POOLS.suffixes.clear()
    try:
        size = cache.SUFFIX_POOL_SIZE
        new = [trial(i) for i in range(size)]
        assert pooled() == list(range(size)) and not any(s.reused for s in new)
        again = trial(0)  # the oldest is used again: it is the newest now
        assert again is new[0] and again.reused and build.reset == [0]
        assert pooled() == [*range(1, size), 0]
        trial(size)
        trial(size + 1)  # two new structures evict the two least recently used: 1 and 2
        assert pooled() == [*range(3, size), 0, size, size + 1]
        assert trial(1) is not new[1]  # an evicted structure builds a new suffix
        cache.keep_suffix(cache.Suffix(key=None, model=new[0].model))  # no key: not kept
        assert len(cache.POOLS.suffixes) == size
        monkeypatch.setattr(
            "searchlab.training.cache.suffix.SUFFIX_POOL_MB", 0
        )  # every suffix is over the bound
        trial(size + 2)
        assert pooled() == [size + 2]  # the newest is kept whatever its size
    finally:
        cache.POOLS.suffixes.clear()


class _PruneAtOnce:
    def __call__(self, epoch: int, logs: dict[str, float]) -> None:
        raise TrialPruned(epoch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fine_tune", [None, FineTune(head_epochs=1, epochs=1)], ids=["one-phase", "two-phase"]
)
def test_cached_trials_reuse_one_compiled_suffix_and_end_as_on_a_new_one(
    project: Path, fine_tune: FineTune | None
):
    """A trial failed on a NaN loss (its learning rate is NaN), then a pruned one, then one
    with another dropout rate, learning rate and batch size train the first trial's compiled
    suffix (block5 and the head); the last ends exactly where it ends on a new suffix."""
    data = _images()
    build = Transfer("vgg16", weights=None, fine_tune=fine_tune)
    first = {
        "frozen_layers": 14,
        "head_width": 8,
        "dropout": 0.0,
        "learning_rate": 1e-3,
        "batch_size": 8,
    }
    last = {**first, "dropout": 0.5, "learning_rate": 3e-3, "batch_size": 6}
    spec = TrialSpec(build=build, data=data, epochs=2, seed=5)
    cache.POOLS.suffixes.clear()

    runs = [
        run_trial(0, first, spec, project / "t0"),
        run_trial(1, {**first, "learning_rate": float("nan")}, spec, project / "t1"),
        run_trial(2, first, spec, project / "t2", on_epoch=_PruneAtOnce()),
        run_trial(3, last, spec, project / "t3"),
    ]
    assert [r.state for r in runs] == [
        TrialState.COMPLETE,
        TrialState.FAILED,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ], runs[1].error
    assert "NaN" in runs[1].error
    assert [r.tags["searchlab.suffix_reused"] for r in runs] == ["false", "true", "true", "true"]

    cache.POOLS.suffixes.clear()  # as in a new process
    new = run_trial(3, last, spec, project / "new")
    assert new.tags["searchlab.suffix_reused"] == "false"
    reused = runs[3]
    assert reused.history.keys() == new.history.keys()
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        np.testing.assert_allclose(reused.history[metric], new.history[metric], rtol=1e-6)
    assert (reused.value, reused.best_epoch) == (new.value, new.best_epoch)
    with np.load(reused.weights_path) as a, np.load(new.weights_path) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
