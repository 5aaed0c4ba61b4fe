"""Every mistake a user can make gets one line naming problem and fix, and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import STUDIES

MNIST = STUDIES / "mnist_dense.py"

TINY_STUDY = """
from searchlab import Study, Int, Float, Dataset
from searchlab.models import dense_classifier
study = Study(name="tiny", space={SPACE}, model=dense_classifier,
              data=Dataset("mnist", subset={{"train": 200, "val": 100}}), trials=1, epochs=1)
"""


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_missing_study_file(cli, project: Path) -> None:
    line = one_error_line(cli("run", "nope.py"))
    assert "Study file nope.py not found" in line


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


def test_grid_with_a_continuous_parameter(cli, project: Path) -> None:
    (project / "s.py").write_text(TINY_STUDY.format(SPACE='{"lr": Float(1e-4, 1e-2, log=True)}'))
    line = one_error_line(cli("run", "s.py", "--strategy", "grid"))
    assert "no grid values" in line and "grid=[" in line
    assert not (project / ".searchlab").exists()


def test_missing_data(cli, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-home"))
    line = one_error_line(cli("run", MNIST, "--data-dir", empty, "--trials", "1"))
    assert "'mnist' not found locally" in line and "Put mnist.npz (with" in line and str(empty) in line
    assert not (project / ".searchlab").exists()


def test_unreachable_tracking_server(cli, project: Path) -> None:
    line = one_error_line(
        cli("run", MNIST, "--trials", "1", "--tracking-uri", "http://127.0.0.1:9")
    )
    assert "Cannot reach the MLflow tracking server http://127.0.0.1:9" in line
    assert "--tracking-uri" in line


def test_unusable_storage(cli, project: Path) -> None:
    line = one_error_line(
        cli("run", MNIST, "--trials", "1", "--storage", "sqlite:////proc/forbidden/optuna.db")
    )
    assert "Cannot open the Optuna storage sqlite:////proc/forbidden/optuna.db" in line


def test_unreachable_database_server(cli, project: Path) -> None:
    line = one_error_line(
        cli("run", MNIST, "--trials", "1", "--storage", "postgresql://u:secret@127.0.0.1:9/db")
    )
    assert "Cannot open the Optuna storage postgresql://u:***@127.0.0.1:9/db" in line
    assert "secret" not in line


def test_export_before_any_run(cli, project: Path) -> None:
    line = one_error_line(cli("export", MNIST, "-o", "best.h5"))
    assert "No study named 'mnist-dense'" in line and "Run it first" in line


def test_export_to_an_unknown_format(cli, project: Path) -> None:
    assert "must end in .h5 or .keras" in one_error_line(cli("export", MNIST, "-o", "m.onnx"))


def test_help_on_every_command() -> None:
    for args in ([], ["run"], ["export"]):
        out = subprocess.run(
            [sys.executable, "-m", "searchlab.cli", *args, "--help"],
            capture_output=True, text=True, check=True,
        ).stdout
        assert "Usage:" in out
