"""Transfer builders: backbones by name or from a file, frozen_layers checks, weights
resolution, and the two-phase fine-tuning schedule."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import Study
from searchlab.data import Data, DataInfo, info_of
from searchlab.errors import SpaceError, StudyDefinitionError
from searchlab.models import FineTune, Transfer
from searchlab.models import transfer as transfer_mod
from searchlab.outcome import TrialState
from searchlab.training import TrialSpec, cache, load_trained, run_trial

CIFAR = DataInfo(input_shape=(32, 32, 3), num_classes=10)


@pytest.fixture(autouse=True)
def _offline_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Keras cache and no download: only what the test writes is found."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.delenv("SEARCHLAB_DATA_DIR", raising=False)

    def offline(*args, **kwargs):
        raise OSError("offline (the test forbids downloads)")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", offline)
    transfer_mod._ARRAYS.clear()


def test_transfer_is_the_builder_that_trials_and_the_cache_ask_for():
    """``cache.TransferBuilder`` is what makes a trial train in phases (on the cache): a
    ``Transfer`` that lost one of its members would train as a plain model."""
    from searchlab.models import dense_classifier

    assert isinstance(Transfer("vgg16", weights=None), cache.TransferBuilder)
    assert isinstance(Transfer("vgg16", weights=None, cache=False), cache.TransferBuilder)
    assert not isinstance(dense_classifier, cache.TransferBuilder)
    assert Transfer.group_by == "frozen_layers"  # grid search groups the points by it


def test_frozen_layers_out_of_range_says_the_valid_range():
    build = Transfer("vgg16", weights=None)
    with pytest.raises(SpaceError, match=r"vgg16: it has 18 layers.*\[0, 18\]"):
        build({"frozen_layers": 19}, CIFAR)
    model = build({"frozen_layers": 14}, CIFAR)
    backbone = Transfer.backbone_layers(model)
    assert len(backbone) == 18 and backbone[14].name == "block5_conv1"
    assert not any(layer.trainable for layer in backbone[:14])
    assert all(layer.trainable for layer in backbone[14:])
    assert model.get_layer("head_dense").trainable


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "alexnet"}, "Unknown backbone 'alexnet'"),
        ({"pooling": "mean"}, "pooling must be one of avg, max, flatten"),
        ({"input_size": 4}, "input_size must be an int >= 8"),
    ],
)
def test_bad_builder_arguments_are_one_line(kwargs, match):
    with pytest.raises(StudyDefinitionError, match=match) as info:
        Transfer(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "frozen"), [("vgg19", 12), ("resnet50", 40), ("mobilenet_v2", 30)]
)
def test_other_backbones_build_and_cut_only_where_one_tensor_crosses(name, frozen):
    model = Transfer(name, weights=None)({"frozen_layers": frozen, "head_width": 8}, CIFAR)
    assert model.output.shape == (None, 10)
    cut = cache.plan_cut(model, cache.cut_points(model))
    assert cut is not None
    backbone = Transfer.backbone_layers(model)
    assert model.layers.index(backbone[frozen]) > cut.index  # never past the frozen prefix
    prefix = keras.Model(model.inputs, model.layers[cut.index].output)
    assert prefix.output.shape[1:] == cut.shape


def _random_vgg_file(folder: Path) -> tuple[Path, list[np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = folder / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"  # Keras's own name
    source.save(path)
    return path, source.get_weights()


def test_imagenet_weights_are_read_from_the_data_directory(tmp_path, monkeypatch):
    path, expected = _random_vgg_file(tmp_path / "data")
    monkeypatch.setenv("SEARCHLAB_DATA_DIR", str(tmp_path / "data"))
    model = Transfer("vgg16")({"frozen_layers": 18}, CIFAR)
    got = [w for layer in Transfer.backbone_layers(model) for w in layer.get_weights()]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    # The same file given as a path works too.
    transfer_mod._ARRAYS.clear()
    model = Transfer("vgg16", weights=str(path))({}, CIFAR)
    np.testing.assert_array_equal(model.get_layer("block5_conv3").get_weights()[0], expected[-2])


def test_imagenet_weights_missing_offline_name_the_file_and_the_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(StudyDefinitionError) as info:
        Transfer("vgg16")({}, CIFAR)
    message = str(info.value)
    assert "\n" not in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path) in message and "weights=None" in message
    with pytest.raises(StudyDefinitionError, match="weights file .*nope.h5 not found"):
        Transfer("vgg16", weights=str(tmp_path / "nope.h5"))({}, CIFAR)


def test_random_backbone_is_the_same_in_every_trial():
    a = Transfer("vgg16", weights=None)({}, CIFAR).get_layer("block3_conv2").get_weights()[0]
    transfer_mod._ARRAYS.clear()  # as in a fresh process
    keras.utils.set_random_seed(99)
    b = Transfer("vgg16", weights=None)({}, CIFAR).get_layer("block3_conv2").get_weights()[0]
    np.testing.assert_array_equal(a, b)


def _tiny_cnn_file(folder: Path) -> Path:
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv_a"),
            keras.layers.MaxPooling2D(name="pool_a"),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv_b"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, activation="softmax", name="old_classes"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    path = folder / "tiny.h5"
    model.save(path)
    return path


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype("int32")
    x = rng.normal(size=(n, 12, 12, 1)).astype("float32") + y[:, None, None, None]
    return x, y


def test_a_model_file_is_cut_before_its_classifier_or_at_a_named_layer(tmp_path):
    path = _tiny_cnn_file(tmp_path)
    info = DataInfo(input_shape=(12, 12, 1), num_classes=2)
    model = Transfer(str(path))({"frozen_layers": 1}, info)
    names = [layer.name for layer in Transfer.backbone_layers(model)]
    assert names == ["conv_a", "pool_a", "conv_b", "flat"]
    cut = Transfer(str(path), cut="pool_a")({}, info)
    assert [layer.name for layer in Transfer.backbone_layers(cut)] == ["conv_a", "pool_a"]
    keras_file = tmp_path / "tiny.keras"
    keras.models.load_model(path).save(keras_file)
    from_keras = Transfer(str(keras_file), cut="conv_b")({}, info)
    assert [layer.name for layer in Transfer.backbone_layers(from_keras)][-1] == "conv_b"
    with pytest.raises(StudyDefinitionError, match="no layer named 'nope'; its layers are"):
        Transfer(str(path), cut="nope")({}, info)
    with pytest.raises(StudyDefinitionError, match=r"takes inputs of shape \(12, 12, 1\)"):
        Transfer(str(path))({}, DataInfo(input_shape=(28, 28, 1), num_classes=2))
    with pytest.raises(SpaceError, match=r"must be an int in \[0, 4\]"):
        Transfer(str(path))({"frozen_layers": 5}, info)


@pytest.mark.slow
def test_two_phase_fine_tuning_runs_phase_one_on_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    monkeypatch.setattr(cache.POOLS, "features", None)  # a fresh process-wide cache
    path = _tiny_cnn_file(tmp_path)
    x, y = _images(96, 0)
    xv, yv = _images(32, 1)
    data = Data(x, y, xv, yv, xv[:0], yv[:0], num_classes=2)
    build = Transfer(str(path), fine_tune=FineTune(head_epochs=2, epochs=1, lr_factor=0.1))
    spec = TrialSpec(build=build, data=data, epochs=5, seed=0)
    params = {"frozen_layers": 2, "learning_rate": 1e-2, "fine_tune_epochs": 2, "head_width": 8}
    result = run_trial(0, params, spec, tmp_path / "trial")
    assert result.state is TrialState.COMPLETE, result.error
    assert result.epochs_run == 4  # head_epochs 2 + fine_tune_epochs 2 (params beat the schedule)
    assert result.history["learning_rate"] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    # Phase one: the whole backbone frozen -> cut after the pooling; phase two: conv_b trains,
    # so the cut moves back to pool_a (frozen_layers=2).
    assert result.tags["searchlab.cache_phases"] == "head_pool:computed,pool_a:computed"
    assert result.tags["searchlab.phases"] == "2"
    # Without the cache, the same schedule gives the same numbers.
    plain = Transfer(
        str(path), cache=False, fine_tune=FineTune(head_epochs=2, epochs=1, lr_factor=0.1)
    )
    again = run_trial(
        0, params, TrialSpec(build=plain, data=data, epochs=5, seed=0), tmp_path / "plain"
    )
    assert again.tags["searchlab.cache_phases"] == "off,off"
    np.testing.assert_allclose(again.history["val_loss"], result.history["val_loss"], rtol=1e-4)


def _digits() -> Data:
    x, y = _images(96, 0)
    xv, yv = _images(32, 1)
    return Data(x, y, xv, yv, xv[:0], yv[:0], num_classes=2)


@pytest.mark.slow
def test_a_phase_without_a_frozen_prefix_trains_the_complete_model(tmp_path, monkeypatch):
    """Fine-tuning the whole backbone (frozen_layers=0) leaves phase two no prefix to cache, so
    the trial builds the complete model: phase one trains its head on the features (a suffix
    sharing the complete model's layers), phase two the complete model on raw inputs; the
    numbers are those of the trial without the cache, and the complete model is saved."""
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    monkeypatch.setattr(cache.POOLS, "features", None)
    path = _tiny_cnn_file(tmp_path)
    data = _digits()
    schedule = FineTune(head_epochs=2, epochs=1, lr_factor=0.1)
    params = {"frozen_layers": 0, "learning_rate": 1e-2, "head_width": 8}
    build = Transfer(str(path), fine_tune=schedule)
    result = run_trial(0, params, TrialSpec(build=build, data=data, epochs=2), tmp_path / "on")
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.cache_phases"] == "head_pool:computed,off"
    assert (result.tags["searchlab.cache"], result.tags["searchlab.cache_layer"]) == (
        "used",
        "head_pool",
    )
    assert result.tags["searchlab.weights_form"] == "full"
    assert "searchlab.suffix_reused" not in result.tags
    assert result.epochs_run == 3  # head_epochs 2 + the schedule's 1
    plain = Transfer(str(path), cache=False, fine_tune=schedule)
    off = run_trial(0, params, TrialSpec(build=plain, data=data, epochs=2), tmp_path / "off")
    assert off.tags["searchlab.cache_phases"] == "off,off"
    for metric in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(result.history[metric], off.history[metric], rtol=1e-4)
    full = load_trained(build, params, info_of(data), result.weights_path)
    accuracy = float(np.mean(full.predict(data.x_val, verbose=0).argmax(1) == data.y_val))
    assert accuracy == pytest.approx(result.value, abs=1e-6)


@pytest.mark.slow
def test_features_over_the_memory_bound_leave_the_trial_as_without_the_cache(tmp_path, monkeypatch):
    """Every phase has a cut, but its features exceed the memory bound: the trial trains the
    complete model on raw inputs, says why per phase, and planning it (which builds the
    template) moves no random stream: the numbers equal the uncached trial's, bit for bit."""
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    monkeypatch.setenv(cache.MEMORY_ENV, "0")
    monkeypatch.setattr(cache.POOLS, "features", None)
    path = _tiny_cnn_file(tmp_path)
    data = _digits()
    schedule = FineTune(head_epochs=1, epochs=1)
    params = {"frozen_layers": 2, "head_width": 8, "dropout": 0.3}
    runs = {}
    for use_cache in (True, False):
        build = Transfer(str(path), cache=use_cache, fine_tune=schedule)
        spec = TrialSpec(build=build, data=data, epochs=1, seed=4)
        runs[use_cache] = run_trial(2, params, spec, tmp_path / str(use_cache))
    on, off = runs[True], runs[False]
    assert on.state is off.state is TrialState.COMPLETE, (on.error, off.error)
    assert on.tags["searchlab.cache"] == "off" and on.tags["searchlab.cache_phases"] == "off,off"
    assert on.tags["searchlab.cache_note.0"] == "features larger than the memory bound"
    assert on.tags["searchlab.cache_note.1"] == "features larger than the memory bound"
    assert "searchlab.cache_note.0" not in off.tags
    assert on.tags["searchlab.weights_form"] == "full"
    assert on.history.keys() == off.history.keys()
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_array_equal(on.history[metric], off.history[metric])


def test_grid_search_runs_the_points_of_one_cut_point_together():
    from searchlab import Choice as C
    from searchlab.engines.optuna import grid_points

    def build(params):
        raise AssertionError("not called")

    for model, expected in (
        (Transfer("vgg16", weights=None), [10, 10, 18, 18]),
        (build, [18, 10, 18, 10]),
    ):
        study = Study(
            name="g",
            space={"head_width": C([8, 16]), "frozen_layers": C([18, 10])},
            model=model,
            data="cifar10",
        )
        points = grid_points(study)
        assert [p["frozen_layers"] for p in points] == expected
        assert len({tuple(sorted(p.items())) for p in points}) == 4


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 2, 16), 3, "same"),
        ((5, 3, 8), 3, "valid"),
        ((3, 4, 8), 2, "same"),
        ((2, 2, 8), 1, "same"),
    ],
)
def test_a_matmul_convolution_computes_and_trains_like_conv2d(shape, kernel, padding):
    """MatmulConv2D (small maps, training on a CPU) gives Conv2D's outputs, and one step of
    training moves its weights where Conv2D's go."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, *shape)).astype("float32")
    y = rng.integers(0, 3, 6)
    models = []
    for cls in (keras.layers.Conv2D, transfer_mod.MatmulConv2D):
        keras.utils.set_random_seed(1)
        inputs = keras.Input(shape)
        h = cls(5, kernel, padding=padding, activation="relu", name="conv")(inputs)
        h = keras.layers.Flatten()(h)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    np.testing.assert_allclose(
        models[1].predict(x, verbose=0), models[0].predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    for model in models:
        model.train_on_batch(x, y)
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_a_cached_suffix_trains_small_convolutions_as_matrix_products():
    """Fine-tuning block4+5 on the cache: the 4x4 and 2x2 convolutions of the suffix are
    MatmulConv2D on a CPU; the complete model keeps stock Conv2D layers."""
    build = Transfer("vgg16", weights=None)
    template, _ = build.build_uncompiled({}, CIFAR)
    build.freeze(template, 10)  # block4 and block5 train; the cut is block3_pool (4x4x256)
    cut = cache.plan_cut(template, cache.cut_points(template))
    assert cut is not None and cut.name == "block3_pool"
    suffix = build.build_suffix({"head_width": 8}, CIFAR, template, cut)
    matmul = [layer.name for layer in suffix.layers if isinstance(layer, transfer_mod.MatmulConv2D)]
    assert matmul == [f"block{b}_conv{c}" for b in (4, 5) for c in (1, 2, 3)]
    assert getattr(suffix, transfer_mod.MATMUL_CONVS) == matmul
    assert not any(isinstance(layer, transfer_mod.MatmulConv2D) for layer in template.layers)
    for name in matmul:
        for a, b in zip(
            template.get_layer(name).get_weights(),
            suffix.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
