"""Resume inside a trial, for real: a 6-epoch trial is killed after its third epoch (SIGKILL
of its worker, SIGKILL of the launcher, SIGTERM as a scheduler sends it), ``searchlab run``
runs again, and the same Optuna trial completes -- no new trial asked -- in the same MLflow
run, with a step for each epoch exactly once, and with the value and weights of a run that
was never interrupted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_helpers import Session, check_consistent, env_for, searchlab_cmd

pytestmark = pytest.mark.slow
EPOCHS = 6
#: how long a worker or launcher may take to stop after a SIGTERM (it stops at the next
#: batch, the checkpoint of the last finished epoch stays, then it closes both stores)
SIGTERM_BOUND_S = 30

#: one configuration, 6 epochs of 3 batches; with $SEARCHLAB_TEST_SLOW each training batch
#: sleeps 0.2 s, so that a test can stop the trial after a chosen epoch
STUDY = """
import os
import time

import keras

from searchlab import Choice, Dataset, Study


class Slow(keras.layers.Layer):
    def call(self, x, training=None):
        if training and os.environ.get("SEARCHLAB_TEST_SLOW"):
            time.sleep(0.2)
        return x


def build(params, info):
    inputs = keras.Input(info.input_shape)
    x = Slow()(keras.layers.Flatten()(inputs))
    x = keras.layers.Dense(params["units"], activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=True,
    )
    return model


study = Study(
    name="epochs",
    space={"units": Choice([16])},
    model=build,
    data=Dataset("mnist", validation="test", subset={"train": 300, "val": 100}),
    strategy="grid",
    trials=1,
    epochs=6,
    batch_size=100,
)
"""


def _stores(home: Path) -> tuple[str, str]:
    return f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}"


def _checkpoint_epoch(home: Path) -> int:
    from searchlab import checkpoint

    for folder in (home / "checkpoints").glob("*"):
        try:
            state = checkpoint.load(folder)
        except checkpoint.CheckpointError:  # replaced while read: the next poll reads it
            continue
        if state is not None:
            return state.epoch
    return 0


def _wait_for_epoch(s: Session, home: Path, epoch: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint_epoch(home) < epoch:
        if s.proc.poll() is not None or time.monotonic() > deadline:
            s.kill()
            raise AssertionError(f"no checkpoint of epoch {epoch}; output:\n{s.finish()}")
        time.sleep(0.05)


def _worker_pid(home: Path) -> int:
    import optuna

    storage, _ = _stores(home)
    (trial,) = optuna.load_study(study_name="epochs", storage=storage).get_trials()
    return int(trial.user_attrs["searchlab.pid"])


def _run(project: Path, home: Path) -> Session:
    study = project / "epochs_study.py"
    study.write_text(STUDY)
    return Session(searchlab_cmd(study), env_for(home, SEARCHLAB_TEST_SLOW="1"), project)


def _trial(home: Path) -> dict[str, Any]:
    """The study's one trial and its MLflow run: value, epoch steps, final weights."""
    import optuna
    from mlflow.tracking import MlflowClient

    from searchlab.training import weights_file

    storage, tracking = _stores(home)
    found = check_consistent(storage, tracking, "epochs", 1)
    (trial,) = optuna.load_study(study_name="epochs", storage=storage).get_trials()
    client = MlflowClient(tracking)
    run_id = trial.user_attrs["mlflow_run_id"]
    steps = {
        key: sorted(m.step for m in client.get_metric_history(run_id, key))
        for key in ("epoch_s", "val_accuracy", "loss")
    }
    folder = client.download_artifacts(run_id, "weights", str(home / f"dl-{run_id}"))
    import h5py

    weights: list[np.ndarray] = []
    with h5py.File(weights_file(Path(folder)), "r") as f:
        f.visititems(
            lambda name, obj: (
                weights.append(np.array(obj))
                if isinstance(obj, h5py.Dataset) and name.startswith("layers")
                else None
            )
        )
    return {
        "trial": trial,
        "steps": steps,
        "weights": weights,
        "run": client.get_run(run_id),
        "found": found,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    project = tmp_path_factory.mktemp("straight")
    home = project / ".searchlab"
    s = _run(project, home)
    out = s.finish()
    assert s.proc.returncode == 0, out
    return _trial(home)


def _assert_resumed(home: Path, uninterrupted: dict[str, Any], resumes: int = 1) -> None:
    got = _trial(home)
    trial = got["trial"]
    assert trial.number == 0 and trial.state.name == "COMPLETE"  # the same trial, no other
    assert trial.user_attrs["searchlab.resumes"] == resumes
    for key, steps in got["steps"].items():
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)  # each epoch exactly once
    assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
    assert trial.value == pytest.approx(uninterrupted["trial"].value, abs=1e-7)
    assert len(got["weights"]) == len(uninterrupted["weights"]) > 0
    for a, b in zip(got["weights"], uninterrupted["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert got["run"].data.tags["searchlab.resumed_epoch"] in {"3", "4", "5"}
    assert not list((home / "checkpoints").glob("*/*")), "the checkpoint outlived its trial"


@pytest.mark.parametrize("victim", ["worker", "launcher"])
def test_a_trial_killed_after_epoch_3_goes_on_there(
    project: Path, uninterrupted: dict[str, Any], victim: str
) -> None:
    home = project / ".searchlab"
    s = _run(project, home)
    _wait_for_epoch(s, home, 3)
    os.kill(_worker_pid(home) if victim == "worker" else s.proc.pid, signal.SIGKILL)
    s.finish(timeout=120)
    import optuna

    storage, _ = _stores(home)
    (trial,) = optuna.load_study(study_name="epochs", storage=storage).get_trials()
    assert trial.state.name == "RUNNING"  # left to be resumed, not failed

    again = _run(project, home)
    out = again.finish()
    assert again.proc.returncode == 0, out
    _assert_resumed(home, uninterrupted)


def test_sigterm_pauses_the_trial_within_the_bound_and_the_next_run_goes_on(
    project: Path, uninterrupted: dict[str, Any]
) -> None:
    from mlflow.tracking import MlflowClient

    home = project / ".searchlab"
    s = _run(project, home)
    _wait_for_epoch(s, home, 3)
    s.kill(signal.SIGTERM)  # as SLURM or Kubernetes send it, to the job's main process
    sent = time.monotonic()
    out = s.finish(timeout=120)
    took = time.monotonic() - sent
    assert s.proc.returncode == 130, out
    assert took < SIGTERM_BOUND_S, took
    storage, tracking = _stores(home)
    import optuna

    (trial,) = optuna.load_study(study_name="epochs", storage=storage).get_trials()
    assert trial.state.name == "RUNNING"
    client = MlflowClient(tracking)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"  # no run left RUNNING
    assert "the next searchlab run goes on" in run.data.tags["searchlab.paused"]

    time.sleep(PAUSE_S)  # paused: this time is not the trial's
    again = _run(project, home)
    out = again.finish()
    assert again.proc.returncode == 0, out
    _assert_resumed(home, uninterrupted)
    _assert_duration_leaves_out_the_pause(home)


#: how long the trial stays paused between its two runs
PAUSE_S = 8


def _assert_duration_leaves_out_the_pause(home: Path) -> None:
    """A paused trial's duration is its training time in both processes, not its start to
    end: in the trials table (``store``), on its MLflow run (``duration_s``)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from searchlab.store import stored

    storage, tracking = _stores(home)
    (trial,) = optuna.load_study(study_name="epochs", storage=storage).get_trials()
    active = trial.user_attrs["searchlab.active_s"]
    assert active >= EPOCHS * 3 * 0.2  # every training batch sleeps 0.2 s, in either run
    assert active <= trial.duration.total_seconds() - PAUSE_S  # the pause is left out
    assert stored(trial).duration_s == active
    run = MlflowClient(tracking).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.metrics["duration_s"] == pytest.approx(active, abs=0.002)
