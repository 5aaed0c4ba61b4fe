"""``searchlab run``'s wiring, without training: the options a launcher hands its workers,
the environment variables behind the flags, the choices the flags accept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from searchlab import backend, cli, engines, runner
from searchlab import workers as workers_mod
from searchlab.engines import RunOptions
from searchlab.study import STRATEGIES

STUDY = """
from searchlab import Dataset, Int, Study

def arrays():
    raise AssertionError("these tests load no data")

def build(params, info):
    raise AssertionError("these tests train nothing")

study = Study(name="wiring", space={"units": Int(1, 4)}, model=build,
              data=Dataset(loader=arrays), trials=3, epochs=4, seed=1)
"""

# Every field differs from its default, so a field the JSON drops or mangles shows.
EVERY_FIELD = RunOptions(
    strategy="gp",
    trials=7,
    timeout=12.5,
    epochs=9,
    seed=42,
    storage="postgresql://u:secret@db/s",
    data_dir="/data",
    engine="keras-tuner",
    max_failures=2,
    precision="mixed_bfloat16",
    pruner="asha",
    prune_min_epochs=2,
    prune_factor=4,
    reeval_top=3,
    reeval_seeds=5,
    executions_per_trial=2,
    parent_run_id="abc123",
    worker="2/3",
    recycle_mb=64.0,
    register="mnist-model",
    allow_changed_settings=True,
    session_key="array-7",
)


def test_run_options_round_trip_every_field() -> None:
    defaults = RunOptions(
        strategy="random", trials=None, timeout=None, epochs=1, seed=0, storage="sqlite:///x.db"
    )
    for field in dataclasses.fields(RunOptions):  # a new field must be added above too
        assert getattr(EVERY_FIELD, field.name) != getattr(defaults, field.name), field.name
    back = RunOptions.from_json(EVERY_FIELD.to_json())
    assert back == EVERY_FIELD
    for field in dataclasses.fields(RunOptions):
        assert type(getattr(back, field.name)) is type(getattr(EVERY_FIELD, field.name))
    assert RunOptions.from_json(defaults.to_json()) == defaults  # the Nones too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must be an object"),
        (json.dumps({**json.loads(EVERY_FIELD.to_json()), "colour": "red"}), "no field colour"),
        (json.dumps({"strategy": "gp"}), "incomplete"),
        ("{not json", "Expecting"),
    ],
)
def test_run_options_from_json_refuses_anything_else(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunOptions.from_json(text)


@pytest.fixture
def wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A study file, and ``searchlab run`` with the runner, the launcher and MLflow
    replaced by recorders: what each was handed is in ``calls``."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "SEARCHLAB_STORAGE",
        "MLFLOW_TRACKING_URI",
        "SEARCHLAB_DATA_DIR",
        workers_mod.LAUNCHER_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    (tmp_path / "study.py").write_text(STUDY)
    calls: dict[str, Any] = {"summary": {}}

    def workers_run(study, options, tracker, listener, *, workers, gpus, worker_command):
        calls.update(launcher=options, workers=workers, worker_command=worker_command)
        return {}

    def runner_run(study, options, tracker, listener=None):
        calls.update(engine=options, study=study, tracker_uri=tracker.uri, listener=listener)
        return calls["summary"]

    monkeypatch.setattr(workers_mod, "run", workers_run)
    monkeypatch.setattr(runner, "run", runner_run)
    monkeypatch.setattr(
        cli, "_tracker", lambda uri, source=None: SimpleNamespace(uri=uri or "sqlite:///home")
    )

    def invoke(*args: Any, env: dict[str, str] | None = None):
        return CliRunner().invoke(cli.main, [str(a) for a in args], env=env, catch_exceptions=False)

    return SimpleNamespace(calls=calls, invoke=invoke, path=tmp_path)


def test_a_worker_gets_the_launchers_options_and_no_password(wiring: SimpleNamespace) -> None:
    storage = "postgresql://u:secret@db:5432/optuna"
    tracking = "http://user:hidden@mlflow:5000"
    result = wiring.invoke(
        "run",
        "study.py",
        "--workers",
        2,
        "--strategy",
        "random",
        "--trials",
        5,
        "--timeout",
        30,
        "--epochs",
        3,
        "--seed",
        7,
        "--subset",
        "100,50",
        "--max-failures",
        2,
        "--precision",
        "mixed_float16",
        "--pruner",
        "asha",
        "--prune-min-epochs",
        1,
        "--prune-factor",
        2,
        "--reeval-top",
        2,
        "--reeval-seeds",
        4,
        "--recycle-mb",
        50,
        "--data-dir",
        wiring.path,
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
    )
    assert result.exit_code == 0, result.output
    launcher = wiring.calls["launcher"]
    assert launcher == RunOptions(
        strategy="random",
        trials=5,
        timeout=30.0,
        epochs=3,
        seed=7,
        storage=storage,
        data_dir=str(wiring.path),
        max_failures=2,
        precision="mixed_float16",
        pruner="asha",
        prune_min_epochs=1,
        prune_factor=2,
        reeval_top=2,
        reeval_seeds=4,
    )
    assert wiring.calls["workers"] == 2

    argv = wiring.calls["worker_command"](1, "parent-run-id")
    assert argv[1:3] == ["-m", "searchlab.cli"]
    assert not any("secret" in a or "hidden" in a for a in argv), argv
    # the worker's environment carries the stores' URLs (workers.worker_env)
    result = wiring.invoke(
        *argv[3:], env={"SEARCHLAB_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking}
    )
    assert result.exit_code == 0, result.output
    assert wiring.calls["engine"] == dataclasses.replace(
        launcher,
        parent_run_id="parent-run-id",
        worker="2/2",
        recycle_mb=50.0,
        reeval_top=0,  # the launcher re-evaluates, after the workers
    )
    assert wiring.calls["tracker_uri"] == tracking
    assert dict(wiring.calls["study"].dataset.subset) == {"train": 100, "val": 50}
    assert wiring.calls["listener"].prefix == "[worker 2/2] "


def test_a_worker_that_grew_exits_to_be_replaced(wiring: SimpleNamespace) -> None:
    assert wiring.invoke("run", "study.py").exit_code == 0
    argv = wiring.calls["worker_command"](0, "parent-run-id")
    wiring.calls["summary"] = {"recycle": True}
    assert wiring.invoke(*argv[3:]).exit_code == workers_mod.RECYCLE
    assert wiring.calls["engine"].worker == "1/1"
    assert wiring.calls["listener"].prefix == "", "a plain run's one worker has no prefix"


def test_a_bad_worker_options_json_is_a_usage_error(wiring: SimpleNamespace) -> None:
    result = wiring.invoke("run", "study.py", "--worker-options", "{}")
    assert result.exit_code == 1  # one `error:` line and 1, as every other mistake (README)
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith("error: Invalid value for '--worker-options'"), line
    assert "incomplete" in line and "--help" in line


def test_environment_variables_stand_in_for_the_flags(wiring: SimpleNamespace) -> None:
    env = {
        "SEARCHLAB_STORAGE": "sqlite:///from-env.db",
        "MLFLOW_TRACKING_URI": "sqlite:///t.db",
        "SEARCHLAB_DATA_DIR": str(wiring.path),
    }
    result = wiring.invoke("run", "study.py", "--in-process", env=env)
    assert result.exit_code == 0, result.output
    options = wiring.calls["engine"]
    assert options.storage == "sqlite:///from-env.db"
    assert options.data_dir == str(wiring.path)
    assert options.recycle_mb is None and options.parent_run_id is None
    assert wiring.calls["tracker_uri"] == "sqlite:///t.db"
    # the study's defaults where no flag says otherwise
    assert (options.trials, options.epochs, options.seed) == (3, 4, 1)
    # a URI from the environment is in force in the next command too: not repeated
    assert "compare them with: searchlab ui study.py\n" in result.output

    result = wiring.invoke("run", "study.py", "--in-process", "--tracking-uri", "sqlite:///t.db")
    assert (
        "compare them with: searchlab ui study.py --tracking-uri sqlite:///t.db\n" in result.output
    )


def test_without_flags_or_environment_the_home_folder_holds_the_storage(
    wiring: SimpleNamespace,
) -> None:
    assert wiring.invoke("run", "study.py", "--in-process").exit_code == 0
    options = wiring.calls["engine"]
    assert options.storage == f"sqlite:///{wiring.path / '.searchlab' / 'optuna.db'}"
    assert options.data_dir is None


def test_gpus_set_the_worker_count_unless_workers_is_given(wiring: SimpleNamespace) -> None:
    assert wiring.invoke("run", "study.py", "--gpus", "0,1,2").exit_code == 0
    assert wiring.calls["workers"] == 3
    assert wiring.invoke("run", "study.py", "--gpus", "0,1,2", "--workers", 1).exit_code == 0
    assert wiring.calls["workers"] == 1


def test_choices_are_the_libraries_own() -> None:
    params = {p.name: p for p in cli.run.params}
    assert tuple(params["precision"].type.choices) == backend.PRECISIONS
    assert tuple(params["engine"].type.choices) == engines.ENGINES
    assert tuple(params["pruner"].type.choices) == engines.PRUNERS
    assert params["strategy"].metavar == f"[{'|'.join(STRATEGIES)}]"
    for name in ("precision", "engine", "pruner", "max_failures", "reeval_top", "reeval_seeds"):
        assert params[name].default == RunOptions.__dataclass_fields__[name].default, name
