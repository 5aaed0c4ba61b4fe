"""``searchlab run studies/cifar_vgg.py`` offline at a tiny budget, then export its best model."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from searchlab import config, report
from searchlab.data import Dataset, load
from searchlab.study import load_study
from searchlab.tracking import MlflowTracker, client
from tests.conftest import mlflow_runs

STUDY = Path(__file__).resolve().parent.parent / "studies" / "cifar_vgg.py"
FINETUNE = STUDY.with_name("cifar_vgg_finetune.py")


@pytest.fixture
def offline_vgg(project: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not any((data_dir / f).is_file() for f in ("cifar10.npz", "cifar10_subset_small.npz")):
        pytest.skip("no CIFAR-10 .npz in the data directory")
    monkeypatch.setenv("CIFAR_VGG_WEIGHTS", "none")  # no ImageNet weights offline
    return project


def test_the_study_files_load_and_declare_the_vgg_space(offline_vgg):
    study = load_study(STUDY)
    assert set(study.search_space) == {
        "frozen_layers",
        "head_width",
        "dropout",
        "learning_rate",
        "batch_size",
    }
    assert study.dataset.scale is False and study.model.backbone == "vgg16"
    assert study.model.weights is None  # the override
    tuned = load_study(FINETUNE)
    assert tuned.model.fine_tune is not None
    assert {"head_epochs", "fine_tune_epochs", "lr_factor"} <= set(tuned.search_space)


@pytest.mark.slow
def test_cifar_vgg_runs_offline_and_exports_a_model_of_raw_images(offline_vgg, cli, data_dir):
    result = cli(
        "run", STUDY, "--trials", "2", "--epochs", "1", "--subset", "64,32", "--strategy", "random"
    )
    assert result.exit_code == 0, result.output
    tracker = MlflowTracker(config.default_tracking_uri())
    runs = mlflow_runs(tracker.uri, "cifar-vgg16")
    trials = [r for r in runs if r.data.tags.get("searchlab.role") != "session"]
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["searchlab.cache"] == "used"
        frozen = int(run.data.params["frozen_layers"])
        assert run.data.tags["searchlab.cache_layer"] == (
            "head_pool"
            if frozen == 18
            else keras.applications.VGG16(include_top=False, weights=None).layers[frozen].name
        )
        # Trained on the cache: only the layers after the prefix are logged, with the
        # prefix's fingerprint; export below assembles the complete model.
        assert run.data.tags["searchlab.weights_form"] == "suffix"
        assert run.data.tags["searchlab.weights_prefix_fingerprint"]
        logged = [a.path for a in client(tracker.uri).list_artifacts(run.info.run_id, "weights")]
        assert logged == ["weights/best.suffix.npz"]

    best_trial = report.best(STUDY)
    assert best_trial.weights_uri.endswith("/weights/best.suffix.npz")
    assert best_trial.model_uri.startswith("models:/m-")  # the complete model, an MLflow Model

    out = offline_vgg / "best.h5"
    result = cli("export", STUDY, "-o", out)
    assert result.exit_code == 0, result.output
    model = keras.models.load_model(out)
    data = load(Dataset("cifar10", subset={"train": 64, "val": 32}, scale=False), data_dir)
    assert model.input_shape == (None, 32, 32, 3)  # raw images in, preprocessing inside
    probs = model.predict(data.x_val, verbose=0)
    best = max(r.data.metrics["objective"] for r in trials)
    assert float(np.mean(probs.argmax(1) == data.y_val)) == pytest.approx(best, abs=1e-6)
