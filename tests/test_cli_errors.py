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
