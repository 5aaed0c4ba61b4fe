"""The best model as an MLflow Model: logged on the session's parent run (``mlflow.keras``
flavor, with a signature), loadable with ``mlflow.pyfunc`` and ``mlflow.keras``, servable
with ``mlflow models serve``, registered with ``--register`` whose ``champion`` alias moves
only on improvement; for an MNIST study and a cached VGG16 transfer study.

The reference each time is ``searchlab export``: it rebuilds the complete model from the
trial's own weights, independently of the logged model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import config
from searchlab.data import Dataset, load
from searchlab.tracking import CHAMPION, ModelScore, champion_move, client
from tests.conftest import STUDIES, mlflow_runs

MNIST = STUDIES / "mnist_dense.py"
VGG = STUDIES / "cifar_vgg.py"
SERVE_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_predict(model_uri: str, tracking_uri: str, x: np.ndarray, folder: Path) -> np.ndarray:
    """Predictions of ``mlflow models serve`` (local environment, 127.0.0.1) for ``x``: one
    HTTP request; the server is stopped afterwards, within ``SERVE_TIMEOUT_S``."""
    try:
        import fastapi  # noqa: F401 - MLflow's scoring server
        import uvicorn  # noqa: F401
    except ImportError as exc:
        if os.environ.get("SEARCHLAB_CI"):
            pytest.fail(f"mlflow models serve needs {exc.name} in CI")
        pytest.skip(f"mlflow models serve needs {exc.name}: pip install mlflow")
    port = _free_port()
    log = folder / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # it runs `uvicorn` from PATH, as in an activated environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve did not start:\n{log.read_text()}")
            time.sleep(0.5)
        request = urllib.request.Request(
            url + "/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        left = max(5.0, deadline - time.monotonic())
        with urllib.request.urlopen(request, timeout=left) as resp:
            return np.asarray(json.load(resp)["predictions"], dtype=np.float32)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _session(experiment: str) -> object:
    (parent,) = [
        r
        for r in mlflow_runs(config.default_tracking_uri(), experiment)
        if r.data.tags.get("searchlab.role") == "session"
        and r.info.status == "FINISHED"
        and "searchlab.model_uri" in r.data.tags
    ][-1:]
    return parent


def check_logged_model(cli, project: Path, study: Path, experiment: str, x: np.ndarray) -> str:
    """The session's best model is an MLflow Model on its parent run that loads with
    pyfunc and keras, and predicts what ``searchlab export``'s model predicts, also served."""
    import mlflow

    uri = config.default_tracking_uri()
    parent = _session(experiment)
    model_uri = parent.data.tags["searchlab.model_uri"]
    assert model_uri.startswith("models:/m-")
    c = client(uri)
    logged = c.get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == parent.info.run_id and logged.name == "best_model"
    assert logged.experiment_id == parent.info.experiment_id
    assert [o.model_id for o in parent.outputs.model_outputs] == [logged.model_id]

    result = cli("export", study, "-o", project / "reference.keras")
    assert result.exit_code == 0, result.output
    expected = keras.models.load_model(project / "reference.keras").predict(x, verbose=0)

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    inputs = pyfunc.metadata.get_input_schema().inputs
    assert [tuple(i.shape) for i in inputs] == [(-1, *x.shape[1:])]  # the signature
    assert [str(i.type) for i in inputs] == ["float32"]
    np.testing.assert_allclose(pyfunc.predict(x), expected, rtol=1e-5, atol=1e-6)
    as_keras = mlflow.keras.load_model(model_uri)
    np.testing.assert_allclose(as_keras.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    served = serve_predict(model_uri, uri, x, project)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    return model_uri


def _champion(name: str) -> tuple[str, dict[str, str]]:
    version = client(config.default_tracking_uri()).get_model_version_by_alias(name, CHAMPION)
    return str(version.version), dict(version.tags)


def _set_champion_value(name: str, value: float) -> None:
    """Make the champion a model of another trial, scored ``value``."""
    c = client(config.default_tracking_uri())
    version = c.get_model_version_by_alias(name, CHAMPION)
    c.set_model_version_tag(name, version.version, "searchlab.value", repr(value))
    c.set_model_version_tag(name, version.version, "searchlab.trial_run", "another-trial")


def check_alias_moves_only_on_improvement(cli, run: tuple[str, ...], name: str) -> None:
    """After a first registration (version 1, champion): the same session again registers
    nothing new (its best trial is the champion's); a session whose best model is worse than
    the champion adds a version and leaves the alias; a better one takes it.  The champion's
    score is set by hand so that "worse" and "better" do not hang on training."""
    version, tags = _champion(name)
    assert version == "1" and tags["searchlab.objective"] == "val_accuracy"
    assert tags["searchlab.direction"] == "maximize"
    result = cli(*run)
    assert result.exit_code == 0, result.output
    assert "holds this trial's model already" in result.output
    _set_champion_value(name, 1.5)  # no accuracy beats it
    result = cli(*run)
    assert result.exit_code == 0, result.output
    assert f"'{CHAMPION}' stays on version 1" in result.output
    assert _champion(name)[0] == "1"
    _set_champion_value(name, -1.0)  # any accuracy beats it
    result = cli(*run)
    assert result.exit_code == 0, result.output
    assert f"version 3: now '{CHAMPION}'" in result.output
    assert _champion(name)[0] == "3"
    versions = client(config.default_tracking_uri()).search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]


@pytest.mark.slow
def test_mnist_best_model_is_an_mlflow_model_served_and_registered(cli, project: Path, data_dir):
    run = ("run", MNIST, "--strategy", "random", "--trials", "2", "--epochs", "1")
    run += ("--subset", "300,100", "--in-process", "--register", "mnist-dense-model")
    result = cli(*run)
    assert result.exit_code == 0, result.output
    assert f"registered model mnist-dense-model version 1: now '{CHAMPION}'" in result.output
    x = load(Dataset("mnist", validation=0.1, subset={"train": 300, "val": 100}), data_dir)
    model_uri = check_logged_model(cli, project, MNIST, "mnist-dense", x.x_val[:5])

    # export reads a registered model too
    result = cli("export", "models:/mnist-dense-model@champion", "-o", project / "champ.h5")
    assert result.exit_code == 0, result.output
    champ = keras.models.load_model(project / "champ.h5")
    import mlflow

    np.testing.assert_allclose(
        champ.predict(x.x_val[:5], verbose=0),
        mlflow.pyfunc.load_model(model_uri).predict(x.x_val[:5]),
        rtol=1e-6,
        atol=1e-6,
    )
    check_alias_moves_only_on_improvement(cli, run, "mnist-dense-model")


@pytest.mark.slow
def test_cached_transfer_best_model_is_the_complete_mlflow_model(
    cli, project: Path, data_dir, monkeypatch: pytest.MonkeyPatch
):
    if not any((data_dir / f).is_file() for f in ("cifar10.npz", "cifar10_subset_small.npz")):
        pytest.skip("no CIFAR-10 .npz in the data directory")
    monkeypatch.setenv("CIFAR_VGG_WEIGHTS", "none")
    run = ("run", VGG, "--strategy", "random", "--trials", "1", "--epochs", "1")
    run += ("--subset", "64,32", "--in-process", "--register", "vgg")
    result = cli(*run)
    assert result.exit_code == 0, result.output
    (trial,) = [
        r
        for r in mlflow_runs(config.default_tracking_uri(), "cifar-vgg16")
        if "searchlab.trial" in r.data.tags
    ]
    assert trial.data.tags["searchlab.weights_form"] == "suffix"  # trained on cached features
    data = load(Dataset("cifar10", subset={"train": 64, "val": 32}, scale=False), data_dir)
    check_logged_model(cli, project, VGG, "cifar-vgg16", data.x_val[:3])
    check_alias_moves_only_on_improvement(cli, run, "vgg")


@pytest.mark.parametrize(
    ("direction", "new", "old", "move"),
    [
        ("maximize", 0.9, 0.8, "move"),
        ("maximize", 0.8, 0.9, "keep"),
        ("maximize", 0.9, 0.9, "keep"),  # a tie keeps the older champion
        ("minimize", 0.2, 0.3, "move"),
        ("minimize", 0.3, 0.2, "keep"),
    ],
)
def test_the_champion_moves_only_to_a_better_model(direction, new, old, move) -> None:
    from searchlab.tracking import score_tags

    champion = score_tags(ModelScore("val_loss", direction, old))
    assert champion_move(ModelScore("val_loss", direction, new), "r2", champion)[0] == move
    assert champion_move(ModelScore("val_loss", direction, new), "r2", None)[0] == "move"
    other = score_tags(ModelScore("val_accuracy", "maximize", 0.0))
    assert champion_move(ModelScore("val_loss", direction, new), "r2", other)[0] == "keep"
    same = {**champion, "searchlab.trial_run": "r2"}
    assert champion_move(ModelScore("val_loss", direction, new), "r2", same)[0] == "same"
