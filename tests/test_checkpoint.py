"""A trial's checkpoint: interrupted after an epoch and run again, it goes on from that epoch
and ends where a trial never interrupted ends (same value, history and weights); an
unreadable checkpoint fails the trial with a clear error; running out of memory retries once
with half the batch size, then fails the trial as the configuration's own."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from searchlab import checkpoint
from searchlab.data import Data, Dataset, info_of, load
from searchlab.models import Transfer
from searchlab.models.transfer import FineTune
from searchlab.outcome import TrialState
from searchlab.training import TrialSpec, load_trained, out_of_memory, run_trial

EPOCHS = 6


def _dense(params: dict[str, Any], info: Any) -> keras.Model:
    inputs = keras.Input(info.input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(params["units"], activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)  # its seed stream must go on where it was
    outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    # a schedule: the optimizer's step count must go on where it was too
    rate = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=3, decay_rate=0.7)
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def mnist(data_dir: Path) -> Data:
    return load(Dataset("mnist", validation="test", subset={"train": 256, "val": 128}), data_dir)


def _images(n_train: int = 24, n_val: int = 12) -> Data:
    """Random 32x32 RGB "images" with three classes."""
    rng = np.random.default_rng(0)
    return Data(
        x_train=rng.uniform(0, 255, size=(n_train, 32, 32, 3)).astype("float32"),
        y_train=rng.integers(0, 3, n_train).astype("int32"),
        x_val=rng.uniform(0, 255, size=(n_val, 32, 32, 3)).astype("float32"),
        y_val=rng.integers(0, 3, n_val).astype("int32"),
        x_test=np.zeros((0, 32, 32, 3), "float32"),
        y_test=np.zeros((0,), "int32"),
        num_classes=3,
    )


class _Stop:
    """``on_epoch`` that records the epochs it is told of and interrupts the trial after
    epoch ``at`` (from 1), as a SIGTERM would."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.epochs = at, []

    def __call__(self, index: int, logs: dict[str, float]) -> None:
        self.epochs.append(index + 1)
        if index + 1 == self.at:
            raise KeyboardInterrupt


def _weights(spec: TrialSpec, params: dict[str, Any], path: Path) -> list[np.ndarray]:
    return load_trained(spec.build, params, info_of(spec.data), path).get_weights()


def _interrupt_and_resume(
    spec: TrialSpec, params: dict[str, Any], tmp: Path, at: int
) -> tuple[Any, Any, _Stop]:
    """The trial uninterrupted; then interrupted after epoch ``at`` and run again."""
    straight = run_trial(4, params, spec, tmp / "straight")
    assert straight.state is TrialState.COMPLETE, straight.error
    spec = dataclasses.replace(spec, checkpoint=tmp / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        run_trial(4, params, spec, tmp / "first", _Stop(at))
    state = checkpoint.load(tmp / "ckpt")
    assert state is not None and state.epoch == at
    told = _Stop()
    resumed = run_trial(4, params, spec, tmp / "again", told)
    assert resumed.state is TrialState.COMPLETE, resumed.error
    assert resumed.tags["searchlab.resumed_epoch"] == str(at)
    # the checkpoint's epoch is told again (a kill may have come before it was), then the rest
    total = len(straight.history["loss"])  # a two-phase trial's epochs are both phases'
    assert told.epochs == list(range(at, total + 1))
    assert resumed.value == straight.value
    assert resumed.best_epoch == straight.best_epoch
    for key, values in straight.history.items():
        if key != "epoch_s":
            np.testing.assert_allclose(resumed.history[key], values, rtol=1e-6, err_msg=key)
    for a, b in zip(
        _weights(spec, params, straight.weights_path),
        _weights(spec, params, resumed.weights_path),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    return straight, resumed, told


@pytest.mark.slow
@pytest.mark.parametrize("at", [3, EPOCHS])
def test_a_dense_trial_goes_on_from_its_checkpoint_as_if_never_stopped(
    mnist: Data, tmp_path: Path, at: int
) -> None:
    spec = TrialSpec(build=_dense, data=mnist, epochs=EPOCHS, batch_size=64, seed=3)
    _interrupt_and_resume(spec, {"units": 16}, tmp_path, at)


@pytest.mark.slow
def test_a_cached_transfer_trial_checkpoints_only_its_suffix(tmp_path: Path) -> None:
    build = Transfer("vgg16", weights=None)
    params = {"frozen_layers": 14, "head_width": 8, "dropout": 0.3, "batch_size": 8}
    spec = TrialSpec(build=build, data=_images(), epochs=4, seed=5)
    _, resumed, _ = _interrupt_and_resume(spec, params, tmp_path, 2)
    assert resumed.tags["searchlab.weights_form"] == "suffix"
    state = checkpoint.load(tmp_path / "ckpt")  # kept until the runner removes it
    assert state is not None
    saved = sum(v.size for v in state.variables)
    assert saved < 7_200_000  # block5 (7.08M) and the head, not all of VGG16 (14.7M)


def _handwritten(params: dict[str, Any], info: Any) -> keras.Model:
    """Transfer learning as tutorials write it: a frozen backbone nested in a Sequential."""
    base = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(8, 3, activation="relu"),
        ],
        name="base",
    )
    base.trainable = False
    model = keras.Sequential(
        [
            base,
            keras.layers.Flatten(),
            keras.layers.Dense(params["units"], activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.slow
def test_a_hand_written_model_cut_by_the_cache_checkpoints_only_its_head(tmp_path: Path) -> None:
    spec = TrialSpec(build=_handwritten, data=_images(), epochs=4, seed=5, backbone_seed=1)
    _, resumed, _ = _interrupt_and_resume(spec, {"units": 8}, tmp_path, 2)
    assert resumed.tags["searchlab.cache"] == "used"
    state = checkpoint.load(tmp_path / "ckpt")
    assert state is not None
    base = 4 * 3 * 3 * 3 + 4 + 8 * 3 * 3 * 4 + 8  # the frozen backbone's 408 weights
    assert (
        sum(v.size for v in state.variables)
        == sum(w.size for w in _handwritten({"units": 8}, None).get_weights()) - base + 2 + 3
    )  # ... are not saved; the Dropout's seed state (2) is, and its twin's rate (3 variables)


@pytest.mark.slow
def test_a_two_phase_trial_killed_in_its_second_phase_goes_on_there(tmp_path: Path) -> None:
    build = Transfer("vgg16", weights=None, fine_tune=FineTune(head_epochs=2, epochs=3))
    params = {"frozen_layers": 14, "head_width": 8, "dropout": 0.3, "batch_size": 8}
    spec = TrialSpec(build=build, data=_images(), epochs=3, seed=5)
    _, resumed, _ = _interrupt_and_resume(spec, params, tmp_path, 3)  # phase 2's first epoch
    assert resumed.tags["searchlab.phases"] == "2"


def test_an_unreadable_checkpoint_fails_the_trial_with_a_clear_error(
    mnist: Data, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / checkpoint.FILE).write_bytes(b"not a checkpoint")
    spec = TrialSpec(build=_dense, data=mnist, epochs=2, checkpoint=folder)
    result = run_trial(0, {"units": 8}, spec, tmp_path / "t")
    assert result.state is TrialState.FAILED
    assert result.error is not None and result.error.startswith("cannot resume")
    assert "unreadable" in result.tags["searchlab.resume_error"]


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused(mnist: Data, tmp_path: Path) -> None:
    spec = TrialSpec(build=_dense, data=mnist, epochs=2, checkpoint=tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        run_trial(0, {"units": 8}, spec, tmp_path / "a", _Stop(1))
    result = run_trial(0, {"units": 32}, spec, tmp_path / "b")  # other shapes
    assert result.state is TrialState.FAILED
    assert "shape" in result.tags["searchlab.resume_error"]


# -- out of memory --------------------------------------------------------------------------


class _Greedy(keras.layers.Layer):
    """Runs out of memory (``MemoryError``) on a training batch of a size in ``sizes``."""

    def __init__(self, sizes: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes = sizes

    def call(self, x: Any, training: bool | None = None) -> Any:
        if training and x.shape[0] in self.sizes:
            raise MemoryError(f"injected: no memory for a batch of {x.shape[0]}")
        return x


def _greedy(sizes: tuple[int, ...]) -> Any:
    def build(params: dict[str, Any], info: Any) -> keras.Model:
        inputs = keras.Input(info.input_shape)
        x = _Greedy(sizes)(keras.layers.Flatten()(inputs))
        outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            run_eagerly=True,
        )
        return model

    return build


@pytest.mark.slow
def test_out_of_memory_retries_once_with_half_the_batch(mnist: Data, tmp_path: Path) -> None:
    spec = TrialSpec(build=_greedy((64,)), data=mnist, epochs=1, batch_size=64)
    result = run_trial(0, {}, spec, tmp_path / "t")
    assert result.state is TrialState.COMPLETE, result.error
    assert result.tags["searchlab.oom_retry"] == "64->32"
    assert "searchlab.oom" not in result.tags


@pytest.mark.slow
def test_out_of_memory_twice_fails_the_trial_as_its_own(mnist: Data, tmp_path: Path) -> None:
    spec = TrialSpec(build=_greedy((64, 32)), data=mnist, epochs=1, batch_size=64)
    result = run_trial(0, {"batch_size": 64}, spec, tmp_path / "t")
    assert result.state is TrialState.FAILED
    assert result.tags["searchlab.oom_retry"] == "64->32"
    assert result.tags["searchlab.oom"] == "true"
    assert result.error is not None and result.error.startswith("out of memory at batch size 32")
    assert not result.early  # not the study's mistake: no fail-fast stop
    assert result.params == {"batch_size": 64}  # the configuration the sampler proposed


def test_what_counts_as_out_of_memory() -> None:
    class ResourceExhaustedError(RuntimeError):  # TensorFlow's, by name
        pass

    assert out_of_memory(MemoryError())
    assert out_of_memory(ResourceExhaustedError("OOM when allocating tensor"))
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying"))
    assert not out_of_memory(ValueError("shapes (3,) and (4,) are incompatible"))


def test_out_of_memory_is_told_to_optuna_and_never_stops_the_study() -> None:
    """A trial that ran out of memory twice: Optuna's constraint says infeasible (what a
    constrained sampler learns from), and neither the failure streak nor fail-fast count
    it."""
    import optuna

    from searchlab.outcome import TrialResult
    from searchlab.runner import fail_fast, failure_streak
    from searchlab.store import StudyStore

    oom = TrialResult(0, {"batch_size": 64}, TrialState.FAILED, error="out of memory at ...")
    oom.tags["searchlab.oom"] = "true"
    assert failure_streak(2, oom, max_failures=3) == 2  # not a third failure in a row
    assert fail_fast(None, oom, settled=False) is None
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    StudyStore(study, storage, "memory").annotate(trial, oom)
    assert trial.constraints == {"out_of_memory": 1.0}
