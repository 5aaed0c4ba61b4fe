"""Shared fixtures: a fresh project folder per test, the data directory, a CLI runner; and
the guard that holds the ``slow`` marker to its meaning (a test that trains a real model)."""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


#: flags that choose where ``searchlab run``'s trials run: given one, ``cli`` adds none
_WHERE_TRIALS_RUN = frozenset({"--in-process", "--workers", "--gpus", "--worker-options"})


def in_process(args: tuple[Any, ...]) -> list[str]:
    """``args`` with ``--in-process`` added to a ``run`` that does not say where its trials
    run: the trials then run in this process (no worker paying ~15 s of Keras import), with
    the MLflow structure a worker's give (``test_mlflow_structure`` holds both to golden)."""
    words = [str(a) for a in args]
    if words[:1] == ["run"] and not _WHERE_TRIALS_RUN.intersection(words):
        words.append("--in-process")
    return words


@pytest.fixture
def cli(project: Path):
    """Run ``searchlab ARGS`` in-process; returns click's Result (exit_code, output).

    A ``run`` runs its trials in this process too (``--in-process`` is added) unless it names
    ``--workers``/``--gpus`` or the test is about the worker process: ``cli(..., worker=True)``
    runs it as the user's command does, in one worker subprocess."""
    from click.testing import CliRunner

    from searchlab.cli import main

    runner = CliRunner()

    def invoke(*args: Any, worker: bool = False):
        words = [str(a) for a in args] if worker else in_process(args)
        return runner.invoke(main, words, catch_exceptions=False)

    return invoke


def mnist_build_model(hp: Any) -> Any:
    """A KerasTuner-style ``build_model(hp)`` for 28x28 MNIST, as the tutorials write it:
    one searched dense layer (the drop-in's and the notebook API's tests)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(hp.Int("units", 16, 64, step=16), activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


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


# -- the slow marker's guard ---------------------------------------------------------------
# ``slow`` means "trains a real model": a test (or a fixture it uses) not marked slow that
# calls ``keras.Model.fit`` or ``searchlab.backend.fit_arrays`` (what every trial's fit goes
# through, ``run_trial`` and in-process ``searchlab run`` included) fails, naming what it
# called.  Training inside a subprocess (a worker) is out of its sight; such tests are slow
# for their ~15 s of Keras import anyway (``--durations`` shows them).  The two functions
# are wrapped when their modules are first imported, so a file that never imports Keras
# pays nothing.
_TRAINED: list[str] = []  # what the running test called, while it is not marked slow
_GUARDING = False
_WATCHED = {"keras": "Model.fit", "searchlab.backend": "fit_arrays"}


def _record(label: str, function: Any) -> Any:
    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _GUARDING and label not in _TRAINED:
            _TRAINED.append(label)
        return function(*args, **kwargs)

    guarded.__searchlab_guard__ = True  # type: ignore[attr-defined]
    return guarded


def _wrap(module: Any, name: str) -> None:
    owner_name, _, attr = _WATCHED[name].rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    function = getattr(owner, attr)
    if not getattr(function, "__searchlab_guard__", False):
        setattr(owner, attr, _record(f"{name}.{_WATCHED[name]}", function))


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds a watched module as Python would, and wraps its function once it has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            _wrap(module, name)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader
        return spec


def _install_guard() -> None:
    for name in _WATCHED:
        if name in sys.modules:
            _wrap(sys.modules[name], name)
    sys.meta_path.insert(0, _WrapOnImport())


_install_guard()


@contextlib.contextmanager
def _guarding(item: pytest.Item) -> Iterator[None]:
    global _GUARDING
    if item.get_closest_marker("slow") is not None:
        yield
        return
    _TRAINED.clear()
    _GUARDING = True
    try:
        yield
    finally:
        _GUARDING = False
    if _TRAINED:
        pytest.fail(
            f"{item.nodeid} trains a real model ({', '.join(_TRAINED)}) but is not marked "
            "slow: mark it @pytest.mark.slow, or train nothing (a stub fit, a smaller check)",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _guarding(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _guarding(item):
        return (yield)
