"""The backend module: precision policies, device names per backend, backend detection;
and a trial under a mixed-precision policy (on whatever backend this process runs)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from searchlab import backend
from searchlab.data import Data
from searchlab.errors import StudyDefinitionError
from searchlab.models import dense_classifier
from searchlab.outcome import TrialState
from searchlab.training import TrialSpec, run_trial
from tests.conftest import REPO


def test_import_sets_gpu_memory_growth_before_any_backend_loads() -> None:
    code = (
        "import os, sys, searchlab, searchlab.cli, searchlab.doctor; "
        "print(os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'), "
        "any(m in sys.modules for m in ('keras', 'tensorflow', 'jax', 'torch')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_FORCE_GPU_ALLOW_GROWTH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["true", "False"]  # set on import; no backend imported by then
    env["TF_FORCE_GPU_ALLOW_GROWTH"] = "false"  # the user's own setting wins
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["false", "False"]


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(StudyDefinitionError, match="mixed_bfloat16"):
        backend.check_precision("half")
    assert backend.check_precision(None) == "float32"


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_policy_is_set_inside_and_restored_after(precision: str) -> None:
    before = keras.config.dtype_policy().name
    with backend.precision_policy(precision) as name:
        assert name == precision
        assert keras.config.dtype_policy().name == precision
        model = dense_classifier({"units": 8}, SimpleNamespace(input_shape=(4,), num_classes=3))
        hidden = model.get_layer("hidden_0")
        assert hidden.compute_dtype == precision.split("_")[1]
        assert hidden.variable_dtype == "float32"
        assert model.get_layer("classes").compute_dtype == "float32"
        assert backend.output_dtype_warning(model, precision) is None
    assert keras.config.dtype_policy().name == before


def test_policy_is_restored_when_the_body_raises() -> None:
    before = keras.config.dtype_policy().name
    with pytest.raises(RuntimeError), backend.precision_policy("mixed_bfloat16"):
        raise RuntimeError("boom")
    assert keras.config.dtype_policy().name == before


def test_a_16_bit_output_layer_is_warned_about() -> None:
    with backend.precision_policy("mixed_bfloat16"):
        inputs = keras.Input(shape=(4,))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
        warning = backend.output_dtype_warning(model, "mixed_bfloat16")
    assert warning is not None and "dtype='float32'" in warning


def test_device_of_reads_each_backends_tensor() -> None:
    class JaxDevice:
        platform, id, device_kind = "gpu", 1, "NVIDIA H100 80GB HBM3"

    class JaxArray:
        def devices(self):
            return {JaxDevice()}

    def model_with(value):
        return SimpleNamespace(weights=[SimpleNamespace(value=value)])

    jax_dev = backend.device_of(model_with(JaxArray()))
    assert (jax_dev.label, jax_dev.name) == ("gpu:1", "NVIDIA H100 80GB HBM3")
    tf_value = SimpleNamespace(device="/job:localhost/replica:0/task:0/device:GPU:2")
    assert backend.device_of(model_with(tf_value)).label == "gpu:2"
    torch_cpu = SimpleNamespace(device=SimpleNamespace(type="cpu", index=None))
    assert backend.device_of(model_with(torch_cpu)).label == "cpu:0"
    assert backend.device_of(SimpleNamespace(weights=[])) is None


def test_device_of_a_real_model_is_one_the_backend_lists() -> None:
    model = dense_classifier({"units": 4}, SimpleNamespace(input_shape=(3,), num_classes=2))
    device = backend.device_of(model)
    assert device is not None
    assert device.label in {d.label for d in backend.devices()}


def test_requested_backend_comes_from_env_then_keras_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert backend.requested() == "tensorflow"
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    assert backend.requested() == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert backend.requested() == "jax"


def test_session_info_names_backend_versions_and_devices() -> None:
    info = backend.session_info()
    assert info["backend"] == keras.backend.backend()
    assert info["backend_version"] == backend.version(info["backend"]) != "unknown"
    assert info["keras_version"] == keras.__version__
    assert info["devices"]


def _tiny_data(n: int = 64) -> Data:
    rng = np.random.default_rng(0)
    x = rng.random((n, 6, 6), dtype=np.float32)
    y = (x.mean(axis=(1, 2)) > 0.5).astype("int32")
    return Data(x, y, x[:16], y[:16], x[:16], y[:16], num_classes=2, source="tiny")


@pytest.mark.slow
def test_trial_trains_under_the_policy_and_tags_backend_and_device(tmp_path: Path) -> None:
    seen = {}

    def build(params, info):
        seen["policy"] = keras.config.dtype_policy().name
        return dense_classifier(params, info)

    spec = TrialSpec(build=build, data=_tiny_data(), epochs=2, precision="mixed_bfloat16")
    result = run_trial(0, {"units": 8, "batch_size": 16}, spec, tmp_path / "t0")
    assert result.state is TrialState.COMPLETE, result.error
    assert seen["policy"] == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # restored after the trial
    assert result.tags["searchlab.backend"] == keras.backend.backend()
    assert result.tags["searchlab.precision"] == "mixed_bfloat16"
    assert result.tags["searchlab.device"] in {d.label for d in backend.devices()}
    assert len(result.history["epoch_s"]) == 2 and min(result.history["epoch_s"]) > 0


def _fit_counting_traces(build_first: bool) -> tuple[keras.Model, list[float], int]:
    data = _tiny_data()
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    info = SimpleNamespace(input_shape=(6, 6), num_classes=2)
    model = dense_classifier({"units": 8, "dropout": 0.2}, info)
    traces = []
    step = model.train_step
    # runs while tracing (JAX passes the state first, then the batch)
    model.train_step = lambda *args: (traces.append(1), step(*args))[1]
    if build_first:
        streams = (random.getstate(), np.random.get_state()[1].tolist())
        backend.build_for_fit(model, data.x_train, data.y_train, 16)
        # built before fit, drawing no random numbers (so fit shuffles as it would have)
        assert model.optimizer.built and model.optimizer.variables
        assert (random.getstate(), np.random.get_state()[1].tolist()) == streams
        assert traces == []  # nothing traced yet: the build is symbolic
    history = model.fit(
        data.x_train,
        data.y_train,
        validation_data=(data.x_val, data.y_val),
        epochs=2,
        batch_size=16,
        verbose=0,
        shuffle=True,
    )
    return model, history.history["val_loss"] + history.history["loss"], len(traces)


@pytest.mark.slow
def test_build_for_fit_builds_before_fit_without_drawing_random_numbers() -> None:
    """On every backend (the checks are in ``_fit_counting_traces``)."""
    model, _, traces = _fit_counting_traces(build_first=True)
    assert traces >= 1 and int(model.optimizer.iterations) == 8  # and fit trains it after


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="on JAX and torch fit's own build draws one more shuffle than a "
    "built model's fit does, so the numbers differ by design (build_for_fit)",
)
def test_build_for_fit_traces_once_and_changes_no_result() -> None:
    model, built_first, traces = _fit_counting_traces(build_first=True)
    _, plain, plain_traces = _fit_counting_traces(build_first=False)
    np.testing.assert_allclose(built_first, plain, rtol=1e-6)  # same seed, same numbers
    # without it TensorFlow creates the optimizer's variables inside the first trace of the
    # train step and traces it a second time
    assert (traces, plain_traces) == (1, 2)


@pytest.mark.slow
def test_a_pruned_trial_copies_and_saves_no_weights(tmp_path: Path, monkeypatch) -> None:
    from searchlab.errors import TrialPruned
    from searchlab.training import Monitor

    copies = []
    copy_best = Monitor.copy_best
    monkeypatch.setattr(Monitor, "copy_best", lambda self: (copies.append(1), copy_best(self)))
    spec = TrialSpec(build=dense_classifier, data=_tiny_data(), epochs=3)
    params = {"units": 8, "batch_size": 16}

    def prune_first(epoch, logs):
        raise TrialPruned(epoch)

    pruned = run_trial(0, params, spec, tmp_path / "t0", prune_first)
    assert pruned.state is TrialState.PRUNED and pruned.value is not None
    assert pruned.weights_path is None and not (tmp_path / "t0").exists()
    assert copies == []
    complete = run_trial(1, params, spec, tmp_path / "t1", lambda epoch, logs: None)
    assert complete.state is TrialState.COMPLETE and complete.weights_path.exists()
    values = complete.history["val_accuracy"]
    improving = [i for i, v in enumerate(values) if v > max(values[:i], default=-1.0)]
    assert len(copies) == len(improving) >= 1  # one copy per improving epoch
    assert complete.best_epoch == improving[-1] + 1  # numbered from 1


class _Calls(keras.callbacks.Callback):
    """Every callback call with its arguments, as numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def _log(self, name: str, index: int | None, logs: dict | None) -> None:
        self.calls.append((name, index, {k: float(v) for k, v in (logs or {}).items()}))

    def on_epoch_begin(self, epoch, logs=None):
        self._log("epoch_begin", epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._log("batch_end", batch, logs)
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._log("epoch_end", epoch, logs)

    stop_after: int | None = None


def _fit_with(fit_arrays: bool, initial_epoch: int, stop_after: int | None):
    data = _tiny_data()  # 64 rows: batches of 12 leave a partial one, 4 steps per call
    keras.backend.clear_session()
    keras.utils.set_random_seed(5)
    info = SimpleNamespace(input_shape=(6, 6), num_classes=2)
    model = dense_classifier({"units": 8, "dropout": 0.3, "learning_rate": 0.01}, info)
    model.steps_per_execution = 4
    calls = _Calls()
    calls.stop_after = stop_after
    keras.utils.set_random_seed(9)
    # as a trial does: fit_arrays runs its own loop only once the optimizer is built
    backend.build_for_fit(model, data.x_train, data.y_train, 12)
    if fit_arrays:
        backend.fit_arrays(
            model,
            data.x_train,
            data.y_train,
            (data.x_val, data.y_val),
            batch_size=12,
            initial_epoch=initial_epoch,
            epochs=3,
            callbacks=[calls],
        )
    else:
        model.fit(
            data.x_train,
            data.y_train,
            validation_data=(data.x_val, data.y_val),
            batch_size=12,
            initial_epoch=initial_epoch,
            epochs=3,
            callbacks=[calls],
            verbose=0,
        )
    return model, calls.calls


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="fit_arrays is model.fit on this backend: nothing to compare",
)
@pytest.mark.parametrize(("initial_epoch", "stop_after"), [(0, None), (1, None), (0, 5)])
def test_fit_arrays_ends_where_fit_ends(initial_epoch: int, stop_after: int | None) -> None:
    """Same seed, same shuffled batches, steps, metrics and callback calls as ``fit`` (it runs
    its own loop, checked here: a Keras that shuffled otherwise would fail), and
    ``stop_training`` from a batch end stops both after the same chunk of steps."""
    ours, our_calls = _fit_with(True, initial_epoch, stop_after)
    assert hasattr(ours, backend._TFLoop.ATTR)  # its own loop ran, not fit
    keras_model, keras_calls = _fit_with(False, initial_epoch, stop_after)
    assert not hasattr(keras_model, backend._TFLoop.ATTR)
    assert our_calls == keras_calls
    for a, b in zip(ours.get_weights(), keras_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(ours.optimizer.iterations) == int(keras_model.optimizer.iterations) > 0


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="predict_arrays is model.predict on this backend: nothing to compare",
)
@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_predict_arrays_returns_what_predict_returns(dtype: str) -> None:
    """Same graph, same numbers, whatever the batch split (a partial last batch here) and
    the input dtype (predict casts floats to Keras's float type, not integers)."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    x = (np.random.default_rng(0).random((37, 8, 8, 3)) * 255).astype(dtype)
    ours = backend.predict_arrays(model, x, 16)
    assert hasattr(model, "_searchlab_predict_step")  # its own traced step ran, not predict
    again = backend.predict_arrays(model, x[:20], 16)  # the kept trace, other arrays
    expected = model.predict(x, batch_size=16, verbose=0)
    assert ours.dtype == expected.dtype and ours.shape == (37, 4)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(again, expected[:20])


def test_outputs_of_a_few_rows_are_predicts_in_its_structure() -> None:
    """The example of the best model's MLflow signature: the same outputs as ``predict``'s,
    arrays, in the same structure (a dict here), for uint8 images as a loader gives them."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = {"a": keras.layers.Dense(2)(x), "b": keras.layers.Dense(3, "softmax")(x)}
    model = keras.Model(inputs, outputs)
    images = (np.random.default_rng(0).random((2, 8, 8, 3)) * 255).astype("uint8")
    ours = backend.outputs_of(model, images)
    expected = model.predict(images, verbose=0)
    assert set(ours) == {"a", "b"}
    for key in ours:
        assert isinstance(ours[key], np.ndarray) and ours[key].dtype == expected[key].dtype
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise_shape", [None, (None, 1)])
def test_dropout_at_a_rate_in_variables_draws_keras_dropouts_masks(noise_shape) -> None:
    """The feature cache's twins (``cache.RateDropout``) drop out as ``Dropout`` does: the
    same values for the same seed state, bit for bit; a Keras that draws its masks otherwise
    fails here (``tests/test_jax_backend.py`` checks JAX's)."""
    x = keras.random.normal((64, 8), seed=1)
    for rate in (0.0, 0.1, 0.37, 0.5):
        want = keras.random.dropout(
            x, rate, noise_shape=noise_shape, seed=keras.random.SeedGenerator(7)
        )
        held = [keras.Variable(v, trainable=False) for v in (rate, 1 - rate, 1 / (1 - rate))]
        got = backend.dropout_at(x, *held, noise_shape, keras.random.SeedGenerator(7))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)
