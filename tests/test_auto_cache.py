"""The feature cache for models users write by hand (issue 17): any compiled model whose first
layers are frozen trains its part after them on cached features, ends where the same trial
without the cache ends, and saves a complete model that predicts the same on raw images;
where it cannot cache, the trial and the session say why."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import Dataset, Study, StudyDefinitionError, engines, runner
from searchlab.data import Data, info_of
from searchlab.outcome import CACHE_REASON_TAG, TrialState
from searchlab.tracking import MlflowTracker
from searchlab.training import TrialSpec, cache, load_trained, run_trial
from tests.conftest import mlflow_runs

SIZE = 32  # the smallest input VGG16 takes


def _images(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=(n, SIZE, SIZE, 3)).astype("float32")


def _arrays(seed: int = 0, n_train: int = 48, n_val: int = 24):
    rng = np.random.default_rng(seed)
    return (
        _images(n_train, rng),
        rng.integers(0, 3, n_train).astype("int32"),
        _images(n_val, rng),
        rng.integers(0, 3, n_val).astype("int32"),
    )


def _data(seed: int = 0) -> Data:
    x, y, xv, yv = _arrays(seed)
    return Data(
        x_train=x,
        y_train=y,
        x_val=xv,
        y_val=yv,
        x_test=np.zeros((0, SIZE, SIZE, 3), "float32"),
        y_test=np.zeros((0,), "int32"),
        num_classes=3,
    )


def _tiny_backbone(name: str = "tiny") -> keras.Model:
    """A small convolutional backbone with a BatchNormalization (frozen: inference mode)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name=f"{name}_conv1")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.MaxPooling2D(4, name=f"{name}_pool")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name=f"{name}_conv2")(x)
    return keras.Model(inputs, x, name=name)


def _frozen_tiny(weights: dict[str, Path]) -> keras.Model:
    """The tiny backbone with the weights file loaded, frozen, as tutorials load theirs."""
    base = _tiny_backbone()
    base.load_weights(weights["tiny"])
    base.trainable = False
    return base


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Backbone weights files the hand-written models load, as users load ImageNet's."""
    folder = tmp_path_factory.mktemp("weights")
    keras.utils.set_random_seed(1234)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    vgg.save_weights(folder / "vgg16.weights.h5")
    tiny = _tiny_backbone()
    bn = tiny.get_layer("tiny_bn")  # moving statistics that are not the defaults
    bn.set_weights([w + 0.1 * (i + 1) for i, w in enumerate(bn.get_weights())])
    tiny.save_weights(folder / "tiny.weights.h5")
    keras.backend.clear_session()
    return {"vgg16": folder / "vgg16.weights.h5", "tiny": folder / "tiny.weights.h5"}


def _compile(model: keras.Model, lr: float = 1e-3) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def sequential_vgg16(weights: dict[str, Path]):
    """Transfer learning as tutorials write it: a frozen VGG16 inside a Sequential."""

    def build_model(params):
        base = keras.applications.VGG16(
            include_top=False, weights=str(weights["vgg16"]), input_shape=(SIZE, SIZE, 3)
        )
        base.trainable = False
        model = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3)),
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(params.get("units", 16), activation="relu"),
                keras.layers.Dropout(0.5),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        return _compile(model)

    return build_model


def functional_tiny(weights: dict[str, Path]):
    """The functional API: ops on the input, the backbone called as a layer, a new head."""

    def build_model(params):
        base = _frozen_tiny(weights)
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.ops.subtract(inputs, 127.5)  # an op, not a layer, before the backbone
        x = base(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(params.get("units", 16), activation="relu")(x)
        x = keras.layers.Dropout(0.3)(x)
        outputs = keras.layers.Dense(3, activation="softmax")(x)
        return _compile(keras.Model(inputs, outputs))

    return build_model


def _spec(build, **kwargs) -> TrialSpec:
    return TrialSpec(build=build, data=_data(), epochs=2, batch_size=16, **kwargs)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty feature cache (memory and disk) per test, and no prefix seen before."""
    monkeypatch.setattr(cache.POOLS, "features", cache.FeatureCache(root=tmp_path / "features"))
    monkeypatch.setattr(cache.POOLS, "seen_prefixes", type(cache.POOLS.seen_prefixes)())
    monkeypatch.setattr(cache.POOLS, "twins", type(cache.POOLS.twins)())
    monkeypatch.setattr(cache.POOLS, "random_prefixes", set())


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, layer", [(sequential_vgg16, "flatten"), (functional_tiny, "global_average_pooling2d")]
)
def test_a_handwritten_model_trains_on_the_cache_and_ends_as_without_it(
    tmp_path: Path, weights: dict[str, Path], make, layer: str
):
    build = make(weights)
    params = {"units": 16}
    cached = run_trial(0, params, _spec(build), tmp_path / "cached")
    plain = run_trial(0, params, _spec(build, cache=False), tmp_path / "plain")
    assert cached.state is plain.state is TrialState.COMPLETE, (cached.error, plain.error)
    assert cached.tags["searchlab.cache"] == "used"
    assert cached.tags["searchlab.cache_layer"] == layer
    assert cached.tags["searchlab.cache_phases"] == f"{layer}:computed"
    # a prefix built once may be random weights a rebuild would not give back: saved whole
    assert cached.tags["searchlab.weights_form"] == "full"
    assert CACHE_REASON_TAG not in cached.tags
    assert plain.tags["searchlab.cache"] == "off"
    assert plain.tags[CACHE_REASON_TAG].startswith("cache=False")
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(cached.history[name], plain.history[name], rtol=1e-5)
    assert cached.value == pytest.approx(plain.value)
    # The saved complete models take raw images and predict alike.
    x_val = _data().x_val
    info = info_of(_data())
    from_cached = load_trained(build, params, info, cached.weights_path)
    predicted = from_cached.predict(x_val, verbose=0)
    from_plain = load_trained(build, params, info, plain.weights_path)
    np.testing.assert_allclose(predicted, from_plain.predict(x_val, verbose=0), atol=1e-6)
    # Another trial with the same backbone reuses the features; another head too.
    again = run_trial(1, {"units": 8}, _spec(build), tmp_path / "again")
    assert again.tags["searchlab.cache_phases"] == f"{layer}:memory"


def _augmented(weights):
    def build(params):
        base = _frozen_tiny(weights)
        model = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3)),
                keras.layers.RandomFlip("horizontal"),
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        return _compile(model)

    return build


def _trainable_first(weights):
    def build(params):
        base = _tiny_backbone()
        base.trainable = False
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Conv2D(3, 1, name="adapter")(inputs)  # trains, before the frozen part
        x = keras.layers.Flatten()(base(x))
        return _compile(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)))

    return build


def _dense(weights):
    def build(params):
        model = keras.Sequential(
            [keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
        )
        model.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    return build


def _random_backbone(weights):
    def build(params):
        base = _tiny_backbone()  # weights=None: initialised from the trial's seed
        base.trainable = False
        model = keras.Sequential(
            [keras.Input((SIZE, SIZE, 3)), base, keras.layers.Flatten(), keras.layers.Dense(3)]
        )
        model.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    return build


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.base = _tiny_backbone()
        self.base.trainable = False
        self.flat = keras.layers.Flatten()
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        return self.out(self.flat(self.base(x)))


def _subclassed(weights):
    return lambda params: _compile(_Subclassed())


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, reason",
    [
        (_augmented, cache.Reason.RANDOM_LAYER),
        (_trainable_first, cache.Reason.NO_PREFIX),
        (_dense, cache.Reason.NO_FROZEN),
        (_subclassed, cache.Reason.NOT_A_GRAPH),
    ],
    ids=["augmentation", "trainable-first", "no-frozen-layer", "subclassed"],
)
def test_a_model_that_cannot_be_cut_trains_on_images_and_says_why(
    tmp_path: Path, weights: dict[str, Path], make, reason: cache.Reason
):
    result = run_trial(0, {}, _spec(make(weights)), tmp_path)
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache"] == "off"
    assert result.tags[CACHE_REASON_TAG].startswith(reason.value + ": ")
    assert result.tags["searchlab.weights_form"] == "full"


@pytest.mark.slow
def test_features_larger_than_the_memory_bound_are_not_cached(
    tmp_path: Path, weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cache.POOLS, "features", cache.FeatureCache(memory_mb=0, disk_mb=0))
    result = run_trial(0, {}, _spec(functional_tiny(weights)), tmp_path)
    assert result.tags["searchlab.cache"] == "off"
    assert result.tags[CACHE_REASON_TAG].startswith(cache.Reason.TOO_LARGE.value)
    assert "SEARCHLAB_CACHE_MEMORY_MB" in result.tags[CACHE_REASON_TAG]


@pytest.mark.slow
def test_a_random_backbone_differs_per_trial_unless_the_study_fixes_its_seed(
    tmp_path: Path, weights: dict[str, Path]
):
    build = _random_backbone(weights)
    first = run_trial(0, {}, _spec(build), tmp_path / "0")
    second = run_trial(1, {}, _spec(build), tmp_path / "1")
    assert first.tags["searchlab.cache"] == "used"  # nothing to compare it with yet
    assert second.tags["searchlab.cache"] == "off"
    assert second.tags[CACHE_REASON_TAG].startswith(cache.Reason.RANDOM_WEIGHTS.value)
    assert "backbone_seed" in second.tags[CACHE_REASON_TAG]
    # With one seed for every trial's build the backbone is the same: its features are shared.
    fixed = [run_trial(n, {}, _spec(build, backbone_seed=7), tmp_path / f"f{n}") for n in (2, 3)]
    assert [r.tags["searchlab.cache_phases"] for r in fixed] == [
        "flatten:computed",
        "flatten:memory",
    ]
    # ... and each trial still fits with its own seed: trial 2 and 3 shuffle differently.
    assert fixed[0].history["loss"] != fixed[1].history["loss"]
    # Random prefixes are saved whole: export and reeval rebuild without the trial's seeds.
    info = info_of(_spec(build).data)
    for r in (first, *fixed):
        assert r.tags["searchlab.weights_form"] == "full"
        load_trained(build, {}, info, r.weights_path)


# -- through the runner: the session's one line and tags; the keras-tuner engine ----------


HANDWRITTEN = """
import keras
from searchlab import Dataset, Study

WEIGHTS = {weights!r}


def build_model(hp):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="tiny_conv1")(x)
    x = keras.layers.BatchNormalization(name="tiny_bn")(x)
    x = keras.layers.MaxPooling2D(4, name="tiny_pool")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="tiny_conv2")(x)
    base = keras.Model(inputs, x, name="tiny")
    base.load_weights(WEIGHTS)
    base.trainable = False
    model = keras.Sequential([
        keras.Input((32, 32, 3)),{augment}
        base,
        keras.layers.Flatten(),
        keras.layers.Dense(hp.Choice("units", [8, 16]), activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(hp.Float("lr", 1e-4, 1e-2, sampling="log")),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
"""


def _study_run(project: Path, weights: dict[str, Path], engine: str, augment: bool):
    from searchlab.hp import HpSpace

    source = HANDWRITTEN.format(
        weights=str(weights["tiny"]),
        augment='\n        keras.layers.RandomFlip("horizontal"),' if augment else "",
    )
    namespace: dict = {}
    exec(compile(source, str(project / "handwritten.py"), "exec"), namespace)
    study = Study(
        name=f"handwritten-{engine}",
        space=None,
        model=namespace["build_model"],
        data=Dataset(loader=lambda: _arrays()),
        strategy="random",
        trials=2,
        epochs=1,
        batch_size=16,
    )
    assert isinstance(study.space, HpSpace)
    options = engines.RunOptions(
        strategy="random",
        trials=2,
        timeout=None,
        epochs=1,
        seed=0,
        storage=f"sqlite:///{project / 'optuna.db'}",
        engine=engine,
    )
    uri = f"sqlite:///{project / 'mlflow.db'}"
    summary = runner.run(study, options, MlflowTracker(uri, project / "mlartifacts"))
    runs = mlflow_runs(uri, study.name)
    session = [r.data.tags for r in runs if "searchlab.trial" not in r.data.tags]
    trials = [r.data.tags for r in runs if "searchlab.trial" in r.data.tags]
    assert len(session) == 1 and len(trials) == 2
    return summary, session[0], sorted(trials, key=lambda t: int(t["searchlab.trial"]))


@pytest.mark.slow
def test_the_session_says_once_why_it_cannot_cache(
    project: Path, weights: dict[str, Path], caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="searchlab"):
        summary, session, trials = _study_run(project, weights, "optuna", augment=True)
    assert summary["n_complete"] == 2
    lines = [r.getMessage() for r in caplog.records if "feature cache is off" in r.getMessage()]
    assert len(lines) == 1 and "RandomFlip" in lines[0], lines
    assert session["searchlab.cache"] == "off"
    assert session[CACHE_REASON_TAG].startswith(cache.Reason.RANDOM_LAYER.value)
    assert [t["searchlab.cache"] for t in trials] == ["off", "off"]


@pytest.mark.slow
def test_keras_tuner_engine_trials_of_a_handwritten_model_share_the_features(
    project: Path, weights: dict[str, Path]
):
    summary, session, trials = _study_run(project, weights, "keras-tuner", augment=False)
    assert summary["n_complete"] == 2
    assert "searchlab.cache" not in session
    assert [t["searchlab.cache_phases"] for t in trials] == ["flatten:computed", "flatten:memory"]
    # the second build gave the same prefix (from a weights file): its suffix is enough
    assert [t["searchlab.weights_form"] for t in trials] == ["full", "suffix"]


WORKERS_STUDY = """

import numpy as np


def arrays():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(72, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, 72).astype("int32")
    return x[:48], y[:48], x[48:], y[48:]


study = Study(name="handwritten-workers", space=None, model=build_model,
              data=Dataset(loader=arrays), strategy="random", trials=4, epochs=1, batch_size=16)
"""


@pytest.mark.slow
def test_workers_share_the_features_of_a_handwritten_model(project: Path, weights: dict[str, Path]):
    """``--workers 2``: every trial trains on the features, computed at most once per worker
    process (the other trials read them from memory, or from the disk another one wrote)."""
    from reliability_helpers import Session, env_for, searchlab_cmd

    path = project / "handwritten.py"
    path.write_text(HANDWRITTEN.format(weights=str(weights["tiny"]), augment="") + WORKERS_STUDY)
    home = project / ".searchlab"
    s = Session(searchlab_cmd(path, "--workers", 2), env_for(home), project)
    out = s.finish()
    assert s.proc.returncode == 0, out
    uri = f"sqlite:///{home / 'mlflow.db'}"
    trials = [
        r.data.tags
        for r in mlflow_runs(uri, "handwritten-workers")
        if "searchlab.trial" in r.data.tags
    ]
    assert len(trials) == 4
    assert {t["searchlab.cache"] for t in trials} == {"used"}
    sources = [t["searchlab.cache_phases"].split(":")[1] for t in trials]
    assert sources.count("computed") <= 2, sources


@pytest.mark.slow
def test_a_partly_frozen_backbone_in_a_sequential_is_cut_inside(
    tmp_path: Path, weights: dict[str, Path]
):
    """Fine-tuning as tutorials write it: the backbone's last layer trains, the rest is frozen:
    the cut falls inside the nested model, and the trial ends as without the cache."""

    def build(params):
        base = _tiny_backbone()
        base.load_weights(weights["tiny"])
        for layer in base.layers[:-1]:
            layer.trainable = False  # tiny_conv2 trains
        model = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3)),
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        return _compile(model)

    cached = run_trial(0, {}, _spec(build), tmp_path / "cached")
    plain = run_trial(0, {}, _spec(build, cache=False), tmp_path / "plain")
    assert cached.tags["searchlab.cache_layer"] == "tiny_pool", cached.tags
    for name in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(cached.history[name], plain.history[name], rtol=1e-5)
    info = info_of(_data())
    x_val = _data().x_val
    np.testing.assert_allclose(
        load_trained(build, {}, info, cached.weights_path).predict(x_val, verbose=0),
        load_trained(build, {}, info, plain.weights_path).predict(x_val, verbose=0),
        atol=1e-6,
    )


@pytest.mark.slow
def test_a_hypermodel_fit_of_its_own_trains_the_model_as_built(
    tmp_path: Path, weights: dict[str, Path]
):
    def fit(params, model, x, y, **kwargs):  # HyperModel.fit: the user's code trains it
        return model.fit(x, y, **kwargs)

    result = run_trial(0, {}, _spec(functional_tiny(weights), fit=fit), tmp_path)
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache"] == "off"
    assert result.tags[CACHE_REASON_TAG].startswith(cache.Reason.OWN_FIT.value)


@pytest.mark.parametrize(
    "option, value", [("cache", "no"), ("backbone_seed", 1.5), ("backbone_seed", True)]
)
def test_the_cache_options_are_checked_in_one_line(option: str, value: object):
    with pytest.raises(StudyDefinitionError, match=f"^{option} must be"):
        Study(name="s", space={}, model=lambda p: None, data="mnist", **{option: value})


def test_the_best_epoch_copy_of_a_part_is_completed_when_a_phase_unfreezes_more():
    """A part on cached features keeps only its own weights for the best epoch; when a later
    phase trains more of the model, the copy is completed with those weights' values then
    (unchanged since), so putting the best epoch back restores every weight of it."""
    from searchlab.training import Monitor

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="base"), keras.layers.Dense(2, name="head")]
    )
    base, head = model.get_layer("base"), model.get_layer("head")
    monitor = Monitor(_spec(lambda params: model), None)
    monitor.target = model
    monitor.keep(head.weights)  # phase one: the head on the base's features
    monitor.copy_best()
    assert [w.shape for w in monitor.best_weights] == [(3, 2), (2,)]  # not the base's
    best_head, base_then = head.get_weights(), base.get_weights()
    for variable in head.weights:  # later epochs of phase one, not better
        variable.assign(variable.numpy() + 1.0)
    monitor.keep(None)  # phase two trains the whole model
    assert len(monitor.best_weights) == 4
    for variable in model.weights:  # phase two changes everything, never better
        variable.assign(variable.numpy() - 5.0)
    monitor.put_best(model)
    for got, want in zip(model.get_weights(), base_then + best_head, strict=True):
        np.testing.assert_array_equal(got, want)


def _searched_head(weights, schedule: bool = False):
    """A frozen backbone and a head whose width, dropout and learning rate are searched."""

    def build_model(params):
        base = _frozen_tiny(weights)
        model = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3)),
                base,
                keras.layers.Flatten(),
                keras.layers.Dense(params["units"], activation="relu"),
                keras.layers.Dropout(params["dropout"]),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        rate = params["learning_rate"]
        if schedule:  # one schedule for every trial: part of the twin's key
            rate = keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5)
        return _compile(model, rate)

    return build_model


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [False, True], ids=["constant-rate", "rate-schedule"])
def test_trials_of_one_head_structure_train_one_twin_and_end_as_without_the_cache(
    tmp_path: Path, weights: dict[str, Path], schedule: bool
):
    """Trials whose heads differ only in dropout rate and learning rate train one compiled
    twin of the head (traced once), each ending as the same trial without the cache, its
    saved complete model predicting alike; another width gets a twin of its own."""
    build = _searched_head(weights, schedule)
    trials = [
        {"units": 16, "dropout": 0.3, "learning_rate": 1e-2},
        {"units": 16, "dropout": 0.0, "learning_rate": 3e-3},  # Dropout(0) draws nothing
        {"units": 16, "dropout": 0.5, "learning_rate": 1e-3},
        {"units": 8, "dropout": 0.2, "learning_rate": 1e-2},
    ]
    info, x_val = info_of(_data()), _data().x_val
    reused = []
    for number, params in enumerate(trials):
        cached = run_trial(number, params, _spec(build), tmp_path / f"cached{number}")
        plain = run_trial(number, params, _spec(build, cache=False), tmp_path / f"plain{number}")
        assert cached.state is plain.state is TrialState.COMPLETE, (cached.error, plain.error)
        reused.append(cached.tags["searchlab.suffix_reused"])
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(cached.history[name], plain.history[name], rtol=1e-5)
        from_cached = load_trained(build, params, info, cached.weights_path)
        from_plain = load_trained(build, params, info, plain.weights_path)
        np.testing.assert_allclose(
            from_cached.predict(x_val, verbose=0), from_plain.predict(x_val, verbose=0), atol=1e-6
        )
    assert reused == ["false", "true", "true", "false"]


def test_one_twin_serves_heads_that_differ_only_in_top_dropout_rates_and_learning_rate():
    """The twin's key leaves out what a twin takes per trial (the part's own Dropout rates, a
    constant learning rate, names) and keeps all else: a nested Dropout's rate (baked into
    the twin's traced steps), widths, other optimizer settings; a rate of 1 gets no twin."""

    def key(rate=0.2, nested=0.1, units=3, lr=0.01, beta_1=0.9):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(units),
                keras.layers.Dropout(rate),
                keras.Sequential([keras.layers.Dense(3), keras.layers.Dropout(nested)]),
                keras.layers.Dense(2),
            ]
        )
        model.compile(keras.optimizers.Adam(lr, beta_1=beta_1), "mse")
        return cache.twin_key(keras.Model(model.inputs, model.outputs), model)

    base = key()
    assert base is not None
    assert key(rate=0.3) == base and key(lr=0.5) == base and key(rate=0.0) == base
    assert key(nested=0.3) != base
    assert key(units=4) != base
    assert key(beta_1=0.8) != base
    assert key(rate=1.0) is None
