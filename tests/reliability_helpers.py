"""Helpers for the crash, worker and PostgreSQL tests: a tiny study file, subprocess
``searchlab run`` sessions that can be killed at a chosen line, and a consistency check that
reads both stores (Optuna and MLflow) directly."""

from __future__ import annotations

import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: A grid of 6 points on 300 MNIST examples, 1 epoch.  With $SEARCHLAB_TEST_HANG set to a
#: path, the first training batch writes that file and then sleeps: the test knows the
#: process is inside ``model.fit`` and kills or interrupts it there.
STUDY = """
import os
import time
from pathlib import Path

import keras

from searchlab import Choice, Dataset, Study


class Hang(keras.layers.Layer):
    def call(self, x, training=None):
        marker = os.environ.get("SEARCHLAB_TEST_HANG")
        if training and marker and not Path(marker).exists():
            Path(marker).write_text("in fit")
            for _ in range(6000):  # short sleeps: a signal that lands on one of TensorFlow's
                time.sleep(0.1)    # threads is then seen by the main thread within 0.1 s
        return x


def build(params, info):
    hang = bool(os.environ.get("SEARCHLAB_TEST_HANG"))
    inputs = keras.Input(info.input_shape)
    x = keras.layers.Flatten()(inputs)
    if hang:
        x = Hang()(x)
    x = keras.layers.Dense(params["units"], activation="relu")(x)
    outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(params["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=hang,
    )
    return model


study = Study(
    name="tiny",
    space={"units": Choice([8, 16, 32]), "learning_rate": Choice([0.001, 0.01])},
    model=build,
    data=Dataset("mnist", validation="test", subset={"train": 300, "val": 100}),
    strategy="grid",
    trials=None,
    epochs=1,
    batch_size=100,
)
"""
GRID_SIZE = 6


def write_study(folder: Path) -> Path:
    path = folder / "tiny_study.py"
    path.write_text(STUDY)
    return path


#: Appended to the tiny study: a process's first trial waits in the builder until
#: $SEARCHLAB_TEST_WORKERS processes have entered one (a file per process id in the folder
#: $SEARCHLAB_TEST_BARRIER).  A worker runs one trial at a time, so none can take a second
#: before every worker holds one: each worker runs a trial whatever the start-up order, where
#: otherwise the first worker up could run them all.  Only workers wait (the launcher builds
#: one model before the search, its preflight, and must not count); a worker that never comes
#: ends the wait after 240 s, and the test then fails on its assertions, not on a hang.
BARRIER = """

import dataclasses

_build_without_barrier = build


def build(params, info):
    import sys

    if "--worker-options" not in sys.argv:  # the launcher's check of one model: no barrier
        return _build_without_barrier(params, info)
    folder = Path(os.environ["SEARCHLAB_TEST_BARRIER"])
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 240
    while len(list(folder.iterdir())) < int(os.environ["SEARCHLAB_TEST_WORKERS"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return _build_without_barrier(params, info)


study = dataclasses.replace(study, model=build)
"""


def write_study_with(folder: Path, extra: str) -> Path:
    path = write_study(folder)
    path.write_text(path.read_text() + extra)
    return path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        SEARCHLAB_HOME=str(home),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SEARCHLAB_STORAGE", None)
    env.update(extra)
    return env


def searchlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "searchlab.cli", "run", *map(str, args)]


def _default_sigint() -> None:
    """The child handles Ctrl-C even if this test process ignores SIGINT (an ignored signal
    is inherited, and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Session:
    """A ``searchlab run`` subprocess whose output lines are read as they come."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_default_sigint,  # noqa: PLW1509 - only resets a signal
        )
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 240) -> str:
        """Block until an output line satisfies ``predicate``; return that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"process ended before the line; output:\n{self.output}")
            self.lines.append(line)
            if predicate(line):
                return line
        self.kill()
        raise AssertionError(f"timed out waiting; output so far:\n{self.output}")

    def wait_for_file(self, path: Path, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{path} never appeared; output:\n{self.finish()}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 300) -> str:
        """Wait for the process to end; return its whole output."""
        self.proc.wait(timeout=timeout)
        while True:
            try:
                line = self._queue.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)


def unshare(*flags: str, probe: str = "true") -> list[str]:
    """The ``unshare`` command prefix that gives a command new namespaces (``--pid --fork
    --mount-proc``, ``--mount``, ...), as root or through a user namespace; the test skips
    where neither works, and fails in CI ($SEARCHLAB_CI), which must run it."""
    import shutil

    import pytest

    if shutil.which("unshare"):
        for prefix in (["unshare", *flags], ["unshare", "--user", "--map-root-user", *flags]):
            found = subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, text=True)
            if found.returncode == 0:
                return prefix
    if os.environ.get("SEARCHLAB_CI"):
        pytest.fail(f"unshare {' '.join(flags)} must work in CI (root or user namespaces)")
    pytest.skip(f"no usable unshare {' '.join(flags)} here")


def check_consistent(
    storage: str, tracking_uri: str, name: str, budget: int, *, grid: bool = True
) -> dict[str, Any]:
    """The invariants a study must satisfy after any crash, read from both stores:

    exactly ``budget`` complete trials; no trial RUNNING or WAITING; no grid point complete
    twice; each complete trial has exactly one FINISHED MLflow child run, the one it links,
    with the same params and objective; no MLflow run RUNNING; no other FINISHED trial run;
    every failed trial's run (if it had one) is FAILED.
    """
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = [t.state.name for t in trials]
    assert len(complete) == budget, states
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states
    if grid:
        keys = [tuple(sorted(t.params.items())) for t in complete]
        assert len(set(keys)) == len(keys), f"a grid point ran twice: {keys}"

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not running, f"MLflow runs left RUNNING: {running}"
    trial_runs = [r for r in runs if "searchlab.trial" in r.data.tags]
    sessions = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    for t in complete:
        mine = [
            r
            for r in trial_runs
            if r.data.tags["searchlab.trial"] == str(t.number) and r.info.status == "FINISHED"
        ]
        assert len(mine) == 1, f"trial {t.number}: {len(mine)} FINISHED runs"
        run = mine[0]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.params == {k: str(v) for k, v in t.params.items()}
        assert math.isclose(run.data.metrics["objective"], t.value, rel_tol=1e-6)
        assert run.data.tags["mlflow.parentRunId"] in {s.info.run_id for s in sessions}
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert len(finished) == len(complete), "a FINISHED MLflow run has no complete Optuna trial"
    by_id = {r.info.run_id: r for r in trial_runs}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("mlflow_run_id") in by_id:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.info.status == "FAILED", (t.number, run.info.status)
            assert run.data.tags.get("searchlab.error"), t.number
    return {"trials": trials, "runs": runs, "sessions": sessions, "trial_runs": trial_runs}


def claim_grid_points(storage_url: str, lock_dir: str, claims: int) -> list[int]:
    """A worker process for the lock test: claim ``claims`` grid points, complete them at
    once (no training), return the claimed ``a`` values."""
    import optuna

    from searchlab import coordination
    from searchlab.engines.optuna import propose_grid
    from searchlab.store import StudyStore, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url)
    study = optuna.load_study(study_name="grid", storage=storage)
    lock = coordination.StudyLock(
        storage=storage, storage_url=storage_url, study_name="grid", lock_dir=Path(lock_dir)
    )
    grid = [{"a": i} for i in range(3 * claims)]
    store = StudyStore(study, storage, storage_url)

    def suggest(trial: optuna.Trial) -> dict[str, int]:
        time.sleep(0.05)  # hold the lock a moment while the params are suggested
        return {"a": trial.suggest_int("a", 0, 100)}

    got = []
    for _ in range(claims):
        claimed = coordination.claim_trial(
            store,
            lock,
            target=None,
            session="w",
            propose=lambda: propose_grid(store, grid, "w"),
            suggest=suggest,
        )
        assert claimed.trial is not None
        value = claimed.params["a"]
        got.append(value)
        study.tell(claimed.trial, float(value))
    return got


def check_closed(home: Path, name: str) -> dict[str, Any]:
    """What every ending must leave, budget met or not: no Optuna trial RUNNING or WAITING,
    no MLflow run RUNNING, each complete trial with one FINISHED run that holds its weights,
    each failed trial's run FAILED.  Returns the trials and runs."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}").trials
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"trials left RUNNING/WAITING: {left}"
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10_000) if exp else []
    running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not running, f"MLflow runs left RUNNING: {running}"
    by_id = {r.info.run_id: r for r in runs}
    for t in trials:
        run = by_id.get(t.user_attrs.get("mlflow_run_id", ""))
        if t.state == TrialState.COMPLETE:
            assert run is not None and run.info.status == "FINISHED", t.number
            files = [a.path for a in client.list_artifacts(run.info.run_id, "weights")]
            assert files, f"trial {t.number}: complete without its weights"
        elif t.state == TrialState.FAIL and run is not None:
            assert run.info.status == "FAILED", (t.number, run.info.status)
    sessions = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    return {"trials": trials, "runs": runs, "sessions": sessions}
