"""Standard MLflow context on every run: the tags MLflow's own ``start_run`` sets (user,
source, git commit of the study file's checkout), the data each trial trained on as MLflow
dataset inputs, the settings that change results as params of the parent run, and the
objective's name on the Optuna study."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from searchlab import config, engines
from searchlab.data import Dataset, load
from searchlab.runner import result_settings
from searchlab.study import load_study
from tests.conftest import STUDIES, mlflow_runs


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.slow
def test_every_run_has_mlflows_context_tags_and_its_data_as_inputs(cli, project: Path, data_dir):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    study_file = project / "mnist_dense.py"
    shutil.copy(STUDIES / "mnist_dense.py", study_file)
    _git(project, "init", "-q", "-b", "main")
    _git(project, "add", "mnist_dense.py")
    _git(project, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "study")
    commit = _git(project, "rev-parse", "HEAD")

    run = ("run", study_file, "--strategy", "random", "--trials", "1", "--epochs", "1")
    result = cli(*run, "--subset", "300,100", worker=True)  # the trial runs in a worker
    assert result.exit_code == 0, result.output

    runs = mlflow_runs(config.default_tracking_uri(), "mnist-dense")
    (parent,) = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    (trial,) = [r for r in runs if "searchlab.trial" in r.data.tags]
    for r in (parent, trial):
        tags = r.data.tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.name"] == str(study_file.resolve())
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.git.branch"] == "main"

    data = load(Dataset("mnist", validation=0.1, subset={"train": 300, "val": 100}), data_dir)
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in trial.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "validation"}
    assert inputs["train"].name == inputs["validation"].name == "mnist"
    assert inputs["train"].digest == data.digest("train")
    assert inputs["validation"].digest == data.digest("val")
    assert json.loads(inputs["train"].profile)["features_shape"] == [300, 28, 28]
    assert json.loads(inputs["validation"].profile)["targets_shape"] == [100]

    params = parent.data.params
    assert params["epochs"] == "1" and params["subset"] == "train=300,val=100"
    assert params["data"] == "mnist" and params["precision"] == "float32"
    assert params["data_digest"] == data.fingerprint

    import optuna

    from searchlab.store import open_storage

    stored = optuna.load_study(
        study_name="mnist-dense", storage=open_storage(config.default_storage())
    )
    assert stored.metric_names == ["val_accuracy"]


def test_transfer_settings_name_the_backbone_its_weights_and_input_size(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from searchlab.data import Data

    monkeypatch.setenv("CIFAR_VGG_WEIGHTS", "none")
    monkeypatch.setenv("CIFAR_VGG_INPUT_SIZE", "48")
    study = load_study(STUDIES / "cifar_vgg.py")
    options = engines.RunOptions(
        strategy="random", trials=1, timeout=None, epochs=2, seed=0, storage="sqlite:///x.db"
    )
    zeros = np.zeros((2, 32, 32, 3), dtype="float32")
    labels = np.zeros(2, dtype="int32")
    data = Data(zeros, labels, zeros, labels, zeros, labels, num_classes=10)
    settings = result_settings(study, options, data)
    assert settings["model.backbone"] == "vgg16"
    assert settings["model.weights"] == "random (seed 0)"
    assert settings["model.input_size"] == "48"
    assert settings["epochs"] == "2" and settings["subset"] == "all"
    assert settings["data_digest"] == data.fingerprint
