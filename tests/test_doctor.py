"""``searchlab doctor``: what it prints, that it writes nothing, and when it exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from tests.conftest import REPO, STUDIES

MNIST = STUDIES / "mnist_dense.py"

STUDY_WITH = """
from searchlab import Dataset, Int, Study
from searchlab.models import dense_classifier
{extra}
study = Study(name="doc", space={{"units": Int(8, 16)}}, model=dense_classifier,
              data={data}, trials=1, epochs=1)
"""


def lines_with(output: str, status: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith(status)]


def test_doctor_reports_backend_devices_data_and_stores(cli, project: Path, data_dir: Path) -> None:
    result = cli("doctor", MNIST)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"backend         {keras.backend.backend()} " in out
    assert "devices         " in out and ("cpu:0" in out or "gpu:0" in out)
    # which rule found it (config.find_data_dir): the project fixture sets the variable
    assert f"data directory  {data_dir.resolve()} (from $SEARCHLAB_DATA_DIR): " in out
    assert "mnist (mnist.npz" in out
    assert "disk            " in out and " GB free at " in out
    assert (
        f"optuna storage  sqlite:///{project / '.searchlab' / 'optuna.db'} (not created yet" in out
    )
    assert "mlflow tracking sqlite:///" in out
    assert "study           mnist-dense" in out
    assert "study data      mnist from " in out and "54000 train, 6000 validation, 28x28" in out
    assert not lines_with(out, "FAIL") and out.rstrip().endswith("nothing a run needs is missing.")
    assert not (project / ".searchlab").exists()  # the doctor looks, it does not create stores


def test_missing_data_directory_fails(cli, project: Path) -> None:
    result = cli("doctor", "--data-dir", project / "nowhere")
    assert result.exit_code == 1
    (line,) = lines_with(result.output, "FAIL")
    assert "data directory" in line and "(from --data-dir) does not exist" in line
    assert "error: 1 problem(s): data directory" in result.output


def test_a_study_whose_loader_fails_is_a_problem(cli, project: Path) -> None:
    (project / "broken.py").write_text(
        STUDY_WITH.format(
            extra="def load():\n    raise OSError('no such bucket')\n",
            data="Dataset(loader=load)",
        )
    )
    result = cli("doctor", "broken.py")
    assert result.exit_code == 1
    (line,) = lines_with(result.output, "FAIL")
    assert "study data" in line and "no such bucket" in line


def test_a_dataset_to_download_is_a_warning_not_a_failure(
    cli, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(project / "empty-keras-home"))
    (project / "c100.py").write_text(STUDY_WITH.format(extra="", data='Dataset("cifar100")'))
    result = cli("doctor", "c100.py")
    assert result.exit_code == 0, result.output
    (line,) = lines_with(result.output, "warn")
    assert "cifar100: no cifar100.npz" in line and "put cifar100.npz in" in line


def test_a_study_file_that_does_not_load_fails(cli, project: Path) -> None:
    result = cli("doctor", "nope.py")
    assert result.exit_code == 1
    (line,) = lines_with(result.output, "FAIL")
    assert "Study file nope.py not found" in line


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages a ``python -X importtime`` run imported, from its stderr."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_unknown_backend_fails_without_importing_keras(project: Path) -> None:
    """Keras picks its backend when first imported and refuses a name it does not know, so
    the doctor must judge $KERAS_BACKEND before anything imports Keras or a backend: a fresh
    ``searchlab doctor`` process says which modules it imported (``-X importtime``)."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "theano",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "searchlab.cli", "doctor"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = lines_with(proc.stdout, "FAIL")
    assert "'theano' (from $KERAS_BACKEND) is not a Keras backend" in line
    imported = _imported(proc.stderr)
    assert {"searchlab", "click"} <= imported, "the import log was read"  # the check can see
    assert not imported & {"keras", "tensorflow", "jax", "torch", "theano"}, imported


def test_unreachable_tracking_server_fails(cli, project: Path) -> None:
    result = cli("doctor", "--tracking-uri", "http://127.0.0.1:9")
    assert result.exit_code == 1
    (line,) = lines_with(result.output, "FAIL")
    assert "Cannot reach the MLflow tracking server http://127.0.0.1:9" in line
