"""Every mistake a user can make gets one line naming problem and fix, and exit code 1.

None of these tests needs a dataset: the ``project`` here has an empty data directory and
Keras cache, so they run (and cannot quietly read one) where no data directory exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.conftest import STUDIES

MNIST = STUDIES / "mnist_dense.py"

TINY_STUDY = """
from searchlab import Study, Int, Float, Dataset
from searchlab.models import dense_classifier
study = Study(name="tiny", space={SPACE}, model=dense_classifier,
              data=Dataset("mnist", subset={{"train": 200, "val": 100}}), trials=1, epochs=1)
"""

# Data from a loader, so the errors that come after the data has loaded need no dataset.
ARRAYS_STUDY = """
import numpy as np
from searchlab import Dataset, Int, Study

def arrays():
    x, y = np.zeros((8, 4), "float32"), np.arange(8) % 2
    return x, y, x, y

def build(params, info):
    raise AssertionError("these runs stop before any trial")

study = Study(name="arrays", space={"units": Int(1, 4)}, model=build,
              data=Dataset(loader=arrays), trials=1, epochs=1)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder as the working directory, and no dataset anywhere (replaces
    conftest's ``project``, which needs one; conftest's ``cli`` runs in this one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    (tmp_path / "no-data").mkdir()
    monkeypatch.setenv("SEARCHLAB_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SEARCHLAB_STORAGE", raising=False)
    return tmp_path


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output  # 2 would be click's usage error
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_missing_study_file(cli, project: Path) -> None:
    line = one_error_line(cli("run", "nope.py"))
    assert "Study file nope.py not found" in line
    assert not (project / ".searchlab").exists(), "nothing may be written"


def test_study_file_with_a_syntax_error(cli, project: Path) -> None:
    (project / "bad.py").write_text("from searchlab import Study\nstudy = Study(\n")
    line = one_error_line(cli("run", "bad.py"))
    assert "bad.py, line" in line and "syntax error" in line


def test_file_that_defines_no_study(cli, project: Path) -> None:
    (project / "empty.py").write_text("x = 1\n")
    assert "defines no Study" in one_error_line(cli("run", "empty.py"))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ('{"u": Int(5, 1)}', "low <= high must hold"),
        ('{"lr": Float(0.0, 1.0, log=True)}', "log scale needs low > 0"),
    ],
)
def test_impossible_space(cli, project: Path, space: str, message: str) -> None:
    (project / "s.py").write_text(TINY_STUDY.format(SPACE=space))
    assert message in one_error_line(cli("run", "s.py"))
    assert not (project / ".searchlab").exists(), "nothing may be written"


def test_unknown_strategy(cli, project: Path) -> None:
    line = one_error_line(cli("run", MNIST, "--strategy", "annealing"))
    assert "Unknown strategy 'annealing'" in line and "grid, random, bayesian, gp" in line
    assert not (project / ".searchlab").exists()


def test_grid_with_a_continuous_parameter(cli, project: Path) -> None:
    (project / "s.py").write_text(TINY_STUDY.format(SPACE='{"lr": Float(1e-4, 1e-2, log=True)}'))
    line = one_error_line(cli("run", "s.py", "--strategy", "grid"))
    assert "no grid values" in line and "grid=[" in line
    assert not (project / ".searchlab").exists()


def test_missing_data(cli, project: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-data"
    empty.mkdir()
    line = one_error_line(cli("run", MNIST, "--data-dir", empty, "--trials", "1"))
    assert (
        "'mnist' not found locally" in line and "Put mnist.npz (with" in line and str(empty) in line
    )
    assert not (project / ".searchlab").exists()


@pytest.mark.parametrize("given_by", ["flag", "environment"])
def test_unreachable_tracking_server(
    cli, project: Path, monkeypatch: pytest.MonkeyPatch, given_by: str
) -> None:
    (project / "s.py").write_text(ARRAYS_STUDY)
    uri = "http://127.0.0.1:9"
    if given_by == "flag":
        result = cli("run", "s.py", "--tracking-uri", uri)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = cli("run", "s.py")
    line = one_error_line(result)
    assert f"Cannot reach the MLflow tracking server {uri}" in line
    assert "--tracking-uri" in line
    assert not (project / ".searchlab").exists(), "no Optuna storage was left either"


def test_unreachable_tracking_server_without_its_password(cli, project: Path) -> None:
    (project / "s.py").write_text(ARRAYS_STUDY)
    result = cli("run", "s.py", "--tracking-uri", "http://me:secret@127.0.0.1:9/")
    line = one_error_line(result)
    assert "Cannot reach the MLflow tracking server http://me:***@127.0.0.1:9/" in line
    assert "secret" not in result.output


@pytest.mark.parametrize("given_by", ["flag", "environment"])
def test_unusable_storage(
    cli, project: Path, monkeypatch: pytest.MonkeyPatch, given_by: str
) -> None:
    (project / "s.py").write_text(ARRAYS_STUDY)
    url = "sqlite:////proc/forbidden/optuna.db"
    if given_by == "flag":
        result = cli("run", "s.py", "--storage", url)
    else:
        monkeypatch.setenv("SEARCHLAB_STORAGE", url)
        result = cli("run", "s.py")
    assert f"Cannot open the Optuna storage {url}" in one_error_line(result)
    assert not (project / ".searchlab").exists(), "no MLflow store was created either"


def test_unusable_tracking_store_leaves_no_optuna_storage(cli, project: Path) -> None:
    """The Optuna storage opens first; when MLflow's store then fails, what the storage
    created (the file, the study, the folder) is taken back."""
    (project / "s.py").write_text(ARRAYS_STUDY)
    uri = "sqlite:////proc/forbidden/mlflow.db"
    line = one_error_line(cli("run", "s.py", "--tracking-uri", uri))
    assert f"Cannot open the MLflow tracking store {uri}" in line
    assert not (project / ".searchlab").exists()


def test_unreachable_database_as_tracking_store_fails_fast_without_its_password(
    cli, project: Path
) -> None:
    import time

    (project / "s.py").write_text(ARRAYS_STUDY)
    started = time.monotonic()
    result = cli("run", "s.py", "--tracking-uri", "postgresql://u:secret@127.0.0.1:9/db")
    line = one_error_line(result)
    assert "Cannot open the MLflow tracking store postgresql://u:***@127.0.0.1:9/db" in line
    assert "secret" not in result.output
    assert time.monotonic() - started < 30, "not MLflow's two minutes of retries"
    assert not (project / ".searchlab").exists()


def test_unreachable_database_server(cli, project: Path) -> None:
    (project / "s.py").write_text(ARRAYS_STUDY)
    result = cli("run", "s.py", "--storage", "postgresql://u:secret@127.0.0.1:9/db")
    line = one_error_line(result)
    assert "Cannot open the Optuna storage postgresql://u:***@127.0.0.1:9/db" in line
    assert "secret" not in result.output, "the password shows nowhere"


def test_export_before_any_run(cli, project: Path) -> None:
    line = one_error_line(cli("export", MNIST, "-o", "best.h5"))
    assert "No study named 'mnist-dense'" in line and "Run it first" in line
    assert not (project / "best.h5").exists()
    assert not (project / ".searchlab").exists(), "no optuna.db is created by a reader"


def test_export_with_a_wrong_tracking_uri_creates_no_store(cli, project: Path) -> None:
    import optuna

    (project / "s.py").write_text(ARRAYS_STUDY)
    home = project / ".searchlab"
    home.mkdir()
    study = optuna.create_study(study_name="arrays", storage=f"sqlite:///{home / 'optuna.db'}")
    study.enqueue_trial({"units": 2})
    trial = study.ask()
    trial.suggest_int("units", 1, 4)
    trial.set_user_attr("mlflow_run_id", "0" * 32)
    study.tell(trial, 0.5)
    wrong = project / "elsewhere" / "mlflow.db"
    result = cli("export", "s.py", "-o", "best.h5", "--tracking-uri", f"sqlite:///{wrong}")
    line = one_error_line(result)
    assert f"No MLflow tracking store at {wrong}" in line and "--tracking-uri" in line
    assert not wrong.parent.exists() and not (project / "best.h5").exists()


def test_export_to_an_unknown_format(cli, project: Path) -> None:
    assert "must end in .h5 or .keras" in one_error_line(cli("export", MNIST, "-o", "m.onnx"))
    assert not (project / "m.onnx").exists()


def test_help_on_every_command() -> None:
    """Every command click knows (a new one too) has help that names its every option."""
    from click.testing import CliRunner

    from searchlab.cli import main

    out = subprocess.run(  # the module entry point, as `searchlab --help` runs it
        [sys.executable, "-m", "searchlab.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("Usage: ")
    assert len(main.commands) >= 5
    for name, command in main.commands.items():
        assert f"  {name} " in out, f"`searchlab --help` does not list {name}"
        result = CliRunner().invoke(main, [name, "--help"], prog_name="searchlab")
        assert result.exit_code == 0, result.output
        help_text = result.output
        assert help_text.startswith(f"Usage: searchlab {name} [OPTIONS]"), help_text
        assert command.help and command.help.split()[0] in help_text
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            flag = max(param.opts, key=len)
            if param.hidden:
                assert flag not in help_text, f"{name}: internal {flag} shows in --help"
                continue
            assert flag in help_text, f"{name} --help does not show {flag}"
            if param.envvar:
                assert f"env var: {param.envvar}" in " ".join(help_text.split()), (name, flag)


# -- more mistakes: the files themselves ------------------------------------------------------


def test_study_file_that_is_not_utf8(cli, project: Path) -> None:
    (project / "latin1.py").write_bytes("x = 1\n# café\n".encode("latin-1"))
    line = one_error_line(cli("run", "latin1.py"))
    assert "latin1.py, line 2: not UTF-8 text" in line and "Save the study file as UTF-8" in line
    assert not (project / ".searchlab").exists()


def test_study_file_that_exits_when_imported(cli, project: Path) -> None:
    (project / "exits.py").write_text("import sys\n\nsys.exit(3)\n")
    line = one_error_line(cli("run", "exits.py"))
    assert "exits.py, line 3: the study file calls sys.exit(3)" in line
    assert '__name__ == "__main__"' in line
    assert not (project / ".searchlab").exists()


def _mnist_like(path: Path, x_dtype: str = "uint8") -> None:
    import numpy as np

    x = np.zeros((40, 28, 28), dtype="uint8")
    x = x.astype(x_dtype) if x_dtype != "str" else np.full((40, 28, 28), "a")
    np.savez_compressed(
        path, x_train=x, y_train=np.arange(40) % 10, x_test=x, y_test=np.arange(40) % 10
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", "is empty: it is not a dataset .npz"),
        ("truncated", "is not a readable dataset .npz"),
        ("corrupt", "is not a readable dataset .npz"),
        ("strings", "x_train holds <U1 values, not numbers"),
    ],
)
def test_a_damaged_dataset_file(cli, project: Path, damage: str, message: str) -> None:
    data = project / "data"
    data.mkdir()
    npz = data / "mnist.npz"
    _mnist_like(npz, "str" if damage == "strings" else "uint8")
    whole = npz.read_bytes()
    if damage == "empty":
        npz.write_bytes(b"")
    elif damage == "truncated":
        npz.write_bytes(whole[: len(whole) // 2])
    elif damage == "corrupt":
        npz.write_bytes(whole[:100] + bytes(200) + whole[300:])
    line = one_error_line(cli("run", MNIST, "--data-dir", data, "--trials", "1"))
    assert str(npz) in line and message in line, line
    assert "Replace it" in line or "numeric array" in line
    assert not (project / ".searchlab").exists()


@pytest.mark.parametrize("command", ["run", "report"])
def test_searchlab_home_that_is_a_file(
    cli, project: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    home = project / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("SEARCHLAB_HOME", str(home))
    (project / "s.py").write_text(ARRAYS_STUDY)
    line = one_error_line(cli(command, "s.py"))
    assert f"SEARCHLAB_HOME={home} is a file, not a folder" in line
    assert "Point SEARCHLAB_HOME at a folder" in line
    assert home.read_text() == "not a folder"


def test_report_csv_into_a_missing_folder(cli, project: Path) -> None:
    line = one_error_line(cli("report", MNIST, "--csv", "missing/trials.csv"))
    assert "Cannot write missing/trials.csv (--csv): folder missing does not exist" in line
    assert not (project / "missing").exists() and not (project / ".searchlab").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", MNIST, "--trials", "0"), "Invalid value for '--trials': 0 is not in the range"),
        (("run", MNIST, "--engine", "bogus"), "Invalid value for '--engine': 'bogus' is not one"),
        (("run", MNIST, "--subset", "abc"), "--subset must be TRAIN or TRAIN,VAL"),
        (("run", "."), "is a directory"),
        (("run",), "Missing argument 'STUDY_FILE'"),
        (("rnu", MNIST), "No such command 'rnu'"),
    ],
    ids=["trials-0", "bad-engine", "subset-abc", "directory", "no-study", "typo"],
)
def test_usage_errors_are_one_line_and_exit_1(cli, project: Path, args, message: str) -> None:
    """click's own refusals read as every other mistake (the README's promise): one
    ``error:`` line, exit 1; no "Usage:" block, no exit 2."""
    result = cli(*args)
    line = one_error_line(result)
    assert message in line, line
    assert "Usage:" not in result.output
    if "subset" not in message:
        assert "--help" in line
    assert not (project / ".searchlab").exists()


def _in_new_mount_namespace(script: str, cwd: Path, env: dict[str, str]):
    """Run ``script`` (sh) in a mount namespace of its own, where it may mount."""
    import subprocess

    from reliability_helpers import unshare

    prefix = unshare(
        "--mount", probe="mount -t tmpfs tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"
    )
    return subprocess.run(
        [*prefix, "sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_export_onto_a_read_only_filesystem(project: Path) -> None:
    import os
    import sys

    from reliability_helpers import env_for

    readonly = project / "ro"
    readonly.mkdir()
    env = env_for(project / ".searchlab")
    done = _in_new_mount_namespace(
        f"mount -t tmpfs -o ro tmpfs {readonly} && exec {sys.executable} -m searchlab.cli "
        f"export {MNIST} -o {readonly}/best.h5",
        project,
        env,
    )
    out = done.stdout + done.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert done.returncode == 1 and len(lines) == 1, out
    assert f"Cannot export to {readonly}/best.h5: folder {readonly} cannot be written" in lines[0]
    assert "Traceback" not in out
    assert os.listdir(readonly) == [] and not (project / ".searchlab").exists()


DISK_FULL_STUDY = """
import numpy as np
import keras
from searchlab import Choice, Dataset, Study


def arrays():
    x = np.random.default_rng(0).random((64, 784), dtype="float32")
    return x, np.arange(64) % 10, x[:32], np.arange(32) % 10


def build(params, info):
    model = keras.Sequential([
        keras.Input(info.input_shape),
        keras.layers.Dense(params["units"], activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(name="full", space={"units": Choice([512, 256])}, model=build,
              data=Dataset(loader=arrays), strategy="grid", trials=None, epochs=1, batch_size=32)
"""


@pytest.mark.slow
def test_a_full_disk_while_a_trial_saves(project: Path) -> None:
    """$TMPDIR (where a trial saves its weights before MLflow copies them) is a 256 KB
    tmpfs: the trial fails, the study stops in one line, no run is left open, and HDF5 is
    never left with a half-written file (it would crash the process at exit)."""
    import sys

    import optuna
    from reliability_helpers import env_for

    from tests.conftest import mlflow_runs

    (project / "full.py").write_text(DISK_FULL_STUDY)
    small = project / "small"
    small.mkdir()
    home = project / ".searchlab"
    env = {**env_for(home), "TMPDIR": str(small)}
    done = _in_new_mount_namespace(
        f"mount -t tmpfs -o size=256k tmpfs {small} && exec {sys.executable} -m searchlab.cli "
        "run full.py --in-process",
        project,
        env,
    )
    out = done.stdout + done.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert done.returncode == 1 and len(lines) == 1, out
    assert "No space left on device" in lines[0] and "best.weights.h5" in lines[0]
    assert "free some space" in lines[0] and "Traceback" not in out
    trials = optuna.load_study(study_name="full", storage=f"sqlite:///{home / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL"]
    assert "No space left on device" in trials[0].user_attrs["error"]
    runs = mlflow_runs(f"sqlite:///{home / 'mlflow.db'}", "full")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
