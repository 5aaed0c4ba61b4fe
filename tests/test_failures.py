"""Failure isolation: a NaN loss, a builder exception or running out of memory fails that
trial only (its error on its MLflow run); ``--max-failures N`` stops after N in a row."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STUDY = """
import keras

from searchlab import Choice, Dataset, Study


def build(params, info):
    mode = params["mode"]
    if mode == "raise":
        raise ValueError("this builder cannot make mode=raise")
    if mode == "oom":
        raise MemoryError("simulated: out of memory while building")
    inputs = keras.Input(info.input_shape)
    x = keras.layers.Flatten()(inputs)
    if mode == "nan":
        x = keras.layers.Lambda(lambda t: t * float("nan"))(x)
    outputs = keras.layers.Dense(info.num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(
    name="fragile",
    space={"mode": Choice(MODES)},
    model=build,
    data=Dataset("mnist", validation="test", subset={"train": 200, "val": 50}),
    strategy="grid",
    trials=None,
    epochs=1,
    batch_size=100,
)
"""


def _write(folder: Path, modes: list[str]) -> Path:
    path = folder / "fragile.py"
    path.write_text(STUDY.replace("MODES", repr(modes)))
    return path


def _stores(project: Path):
    import optuna
    from mlflow.tracking import MlflowClient

    home = project / ".searchlab"
    trials = optuna.load_study(study_name="fragile", storage=f"sqlite:///{home / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fragile").experiment_id])
    return trials.get_trials(), runs


def test_nan_builder_error_and_oom_fail_alone(cli, project: Path) -> None:
    result = cli("run", _write(project, ["nan", "raise", "oom", "ok"]))
    assert result.exit_code == 0, result.output
    assert "trials: 1 complete, 0 pruned, 3 failed" in result.output
    trials, runs = _stores(project)
    by_mode = {t.params["mode"]: t for t in trials}
    assert {m: t.state.name for m, t in by_mode.items()} == {
        "nan": "FAIL",
        "raise": "FAIL",
        "oom": "FAIL",
        "ok": "COMPLETE",
    }
    errors = {
        r.data.params["mode"]: (r.info.status, r.data.tags.get("searchlab.error", ""))
        for r in runs
        if "searchlab.trial" in r.data.tags
    }
    assert errors["nan"][0] == "FAILED" and "NaN/inf loss" in errors["nan"][1]
    assert errors["raise"][0] == "FAILED" and "cannot make mode=raise" in errors["raise"][1]
    assert errors["oom"][0] == "FAILED" and "MemoryError" in errors["oom"][1]
    assert errors["ok"][0] == "FINISHED"


def test_max_failures_stops_the_study_with_a_clear_message(cli, project: Path) -> None:
    result = cli("run", _write(project, ["raise", "oom", "nan", "ok"]), "--max-failures", "2")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    # out of memory is the trial's own failure (its batch size), not the study's: it does
    # not count toward the streak, so the study stops at the NaN trial after it
    assert last.startswith(
        "error: Stopped the study after 2 failed trials in a row "
        "(--max-failures 2); last error: NaN/inf loss"
    ), last
    trials, runs = _stores(project)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL"]
    oom = [r for r in runs if r.data.params.get("mode") == "oom"]
    assert len(oom) == 1 and "searchlab.oom" in oom[0].data.tags
    assert all(r.info.status != "RUNNING" for r in runs)
    (session,) = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    assert session.info.status == "FAILED"


#: on PYTHONPATH of a ``searchlab run``: the Optuna store's disk fills as the first trial
#: ends -- every later write to it fails as SQLite says it, through SQLAlchemy and Optuna
DISK_FILLS = """
import sqlite3

import sqlalchemy.exc
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage

full = []


def _full(*args, **kwargs):
    full.append(True)
    cause = sqlalchemy.exc.OperationalError(
        "UPDATE trials SET state=?", {}, sqlite3.OperationalError("database or disk is full")
    )
    raise StorageInternalError(
        "An exception is raised during the commit. This typically happens due to invalid data "
        "in the commit, e.g. exceeding max length."
    ) from cause


def _until_full(method):
    def write(*args, **kwargs):
        if full:
            _full()
        return method(*args, **kwargs)

    return write


_set_state = RDBStorage.set_trial_state_values


def _set_trial_state_values(self, trial_id, state, values=None):
    if state.is_finished() or full:  # a claim (WAITING -> RUNNING) still fits
        _full()
    return _set_state(self, trial_id, state, values)


RDBStorage.set_trial_state_values = _set_trial_state_values
for name in ("set_trial_user_attr", "set_trial_system_attr", "set_study_user_attr"):
    setattr(RDBStorage, name, _until_full(getattr(RDBStorage, name)))
"""


def test_a_full_store_disk_stops_in_one_line_and_closes_the_runs(project: Path) -> None:
    """The disk of the Optuna store fills when a trial ends: one line that says so and
    where, exit 1, no traceback (SQLAlchemy's or ours), and the MLflow runs it could still
    write closed -- the trial FAILED, the session FAILED; the Optuna trial it could not
    write is failed by the next run (it is stale)."""
    import os
    import subprocess
    import sys

    import optuna

    from tests.conftest import mlflow_runs

    study = _write(project, ["ok"])
    hooks = project / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(DISK_FILLS)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "searchlab.cli", "run", str(study), "--in-process"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": path},
        cwd=project,
    )
    out = done.stdout + done.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and len(errors) == 1, out
    home = project / ".searchlab"
    assert errors[0].startswith(f"error: no space left on {home}"), errors[0]
    assert "database or disk is full" in errors[0] and "free some space" in errors[0]
    assert "Traceback" not in out and "[SQL:" not in out and "sqlalche.me" not in out, out
    runs = {
        r.data.tags.get("searchlab.role", "trial"): r
        for r in mlflow_runs(f"sqlite:///{home / 'mlflow.db'}", "fragile")
    }
    assert runs["session"].info.status == "FAILED"
    assert runs["trial"].info.status == "FAILED"
    (trial,) = optuna.load_study(
        study_name="fragile", storage=f"sqlite:///{home / 'optuna.db'}"
    ).get_trials()
    assert trial.state.name == "RUNNING"  # unwritable: the next run fails it as stale
