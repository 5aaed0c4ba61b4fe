"""Shared fixtures: a fresh project folder per test, the data directory, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"


def _data_dir() -> Path | None:
    value = os.environ.get("SEARCHLAB_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def store_templates(tmp_path_factory: pytest.TempPathFactory):
    """One folder of empty MLflow stores for the whole run (not the user's ~/.cache): the
    first test that tracks migrates one, every later new store is a copy."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("store-templates")
        mp.setenv("SEARCHLAB_STORE_TEMPLATES", str(folder))
        yield folder


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = _data_dir()
    if found is None or not (found / "mnist.npz").is_file():
        if os.environ.get("SEARCHLAB_CI"):
            pytest.fail("SEARCHLAB_DATA_DIR must point at a folder with mnist.npz in CI")
        pytest.skip("no data directory with mnist.npz: set SEARCHLAB_DATA_DIR")
    # loaders and Dataset(...) calls inside tests find the data as searchlab would
    os.environ.setdefault("SEARCHLAB_DATA_DIR", str(found))
    return found


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Path:
    """A fresh project folder as the working directory, with its own .searchlab/ stores."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEARCHLAB_HOME", str(tmp_path / ".searchlab"))
    monkeypatch.setenv("SEARCHLAB_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SEARCHLAB_STORAGE", raising=False)
    return tmp_path


@pytest.fixture
def cli(project: Path):
    """Run ``searchlab ARGS`` in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from searchlab.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def mlflow_runs(uri: str, experiment: str) -> list:
    """Every MLflow run (MLflow's own ``Run`` objects) of an experiment, oldest first: tests
    read MLflow directly, searchlab's code only through ``searchlab.tracking``."""
    from searchlab.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(
        c.search_runs(
            [exp.experiment_id], max_results=50_000, order_by=["attributes.start_time ASC"]
        )
    )
