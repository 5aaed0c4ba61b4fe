"""A new user's first hour: the data directory found from any shell, a run that cannot train
writes nothing (and so pins nothing), error lines that name the fix in the study's own terms,
``doctor`` saying what a run will miss, ``run --try`` beside the real study, and ``export``
without the study's environment variables set again."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest

from searchlab import config
from searchlab.errors import StudyDefinitionError
from searchlab.store import StudyStore, study_names
from tests.conftest import STUDIES, mlflow_runs

# --------------------------------------------------------------------- the data directory


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.DATA_DIR_ENV, raising=False)


def test_the_data_directory_rule_flag_then_environment_then_project_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_data_env: None
) -> None:
    project = tmp_path / "project"
    deep = project / "notebooks" / "deep"
    deep.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (project / "pyproject.toml").write_text('[tool.searchlab]\ndata_dir = "../data"\n')

    found = config.find_data_dir(start=deep)  # searched upward, relative to the file's folder
    assert found.path == tmp_path / "data" and found.problem is None
    assert found.source == f"pyproject.toml [tool.searchlab] at {project / 'pyproject.toml'}"
    assert found.describe() == f"{tmp_path / 'data'} (from {found.source})"

    # a nearer searchlab.toml wins; a pyproject.toml without the table does not count
    (project / "notebooks" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert config.find_data_dir(start=deep).source.startswith("pyproject.toml [tool.searchlab]")
    (project / "notebooks" / "searchlab.toml").write_text('data_dir = "/elsewhere"\n')
    found = config.find_data_dir(start=deep)
    assert found.path == Path("/elsewhere") and found.source.startswith("searchlab.toml at ")
    assert "does not exist" in (found.problem or "") and "searchlab.toml at" in found.problem

    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    assert config.find_data_dir(start=deep).source == "$SEARCHLAB_DATA_DIR"
    assert config.find_data_dir(project, start=deep).source == "--data-dir"

    monkeypatch.delenv(config.DATA_DIR_ENV)
    assert config.find_data_dir(start=tmp_path).path is None  # nothing above tmp_path names one


def test_a_project_file_that_is_not_toml_is_one_line(tmp_path: Path, no_data_env: None) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.searchlab\n")
    found = config.find_data_dir(start=tmp_path)
    assert found.problem and f"{tmp_path / 'pyproject.toml'} cannot be read" in found.problem
    (tmp_path / "pyproject.toml").write_text("[tool.searchlab]\ndata_dir = 3\n")
    assert "must be a folder path (a string), got 3" in config.find_data_dir(start=tmp_path).problem


def test_this_repository_names_the_shared_data_for_a_fresh_clone(no_data_env: None) -> None:
    repo = STUDIES.parent
    found = config.find_data_dir(start=repo / "studies")
    assert found.path == (repo.parent / "shared" / "data").resolve()
    assert found.source == f"pyproject.toml [tool.searchlab] at {repo / 'pyproject.toml'}"


# ------------------------------------------------------ settings a study reads from the env


def test_a_setting_remembers_the_variable_that_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import searchlab

    monkeypatch.delenv("FIRST_RUN_KNOB", raising=False)
    assert searchlab.setting("FIRST_RUN_KNOB", default="Knob-Default") == "Knob-Default"
    (read,) = config.settings_read("knob-default")
    assert (read.name, read.from_env, read.study_file) == ("FIRST_RUN_KNOB", False, None)
    assert config.setting_for("knob-default") == read  # read outside a study file
    monkeypatch.setenv("FIRST_RUN_KNOB", "/w.h5")
    assert searchlab.setting("FIRST_RUN_KNOB", default="Knob-Default") == "/w.h5"
    assert config.settings_read("knob-default") == [] and config.settings_read("/w.h5")[0].from_env
    with config.loading_study("s.py"):  # a study file's builder does not take another's
        assert config.setting_for("/w.h5") is None


def test_the_missing_weights_line_names_the_studys_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from searchlab.study import load_study

    monkeypatch.delenv("CIFAR_VGG_WEIGHTS", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    study = load_study(
        "studies/cifar_vgg.py" if Path("studies").is_dir() else STUDIES / "cifar_vgg.py"
    )

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://x: None -- [Errno -3] name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(StudyDefinitionError) as caught:
        study.model.fetch_weights((32, 32, 3))
    line = str(caught.value)
    assert line.startswith(
        f"VGG16's ImageNet weights are not in {tmp_path} nor in {tmp_path / 'keras' / 'models'} "
        "and could not be downloaded ([Errno -3] name resolution); this study takes them from "
        "$CIFAR_VGG_WEIGHTS: run `CIFAR_VGG_WEIGHTS=none searchlab run "
    ), line
    assert (
        "cifar_vgg.py` (a random fixed backbone) or set CIFAR_VGG_WEIGHTS to a weights file" in line
    )
    assert f"or put vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 in {tmp_path}." in line

    monkeypatch.setenv("CIFAR_VGG_WEIGHTS", str(tmp_path / "mine.h5"))
    study = load_study(STUDIES / "cifar_vgg.py")
    with pytest.raises(
        StudyDefinitionError, match=r"not found: this study takes them from \$CIFAR"
    ):
        study.model.fetch_weights((32, 32, 3))


def test_a_study_whose_trials_never_started_pinned_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def open_(epochs: str) -> StudyStore:
        return StudyStore.open(
            "s",
            url,
            direction="maximize",
            described={"a": "int [1, 3]", "_objective": "val_accuracy"},
            sampler=optuna.samplers.RandomSampler(),
            settings={"epochs": epochs, "model.weights": "imagenet"},
        )

    open_("3")  # a session that stopped before its first trial
    store = open_("1")  # not refused: there is nothing to compare with
    assert store.changed_settings == {}
    store.ostudy.enqueue_trial({})  # a trial (waiting) is there now: its settings are pinned
    with pytest.raises(StudyDefinitionError, match=r"epochs 1 -> 2"):
        open_("2")


# --------------------------------------------------------------- the CLI on a fresh project


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Path:
    """A new user's project: a copy of studies/cifar_vgg.py and a pyproject.toml naming the
    data directory, a fresh home folder (no Keras cache, no weights), no searchlab variable
    set, and Keras's downloads failing as they do offline."""
    import keras

    if not any((data_dir / f).is_file() for f in ("cifar10.npz", "cifar10_subset_small.npz")):
        pytest.skip("no CIFAR-10 file in the data directory")
    project = tmp_path / "project"
    (project / "studies").mkdir(parents=True)
    shutil.copy(STUDIES / "cifar_vgg.py", project / "studies")
    (project / "pyproject.toml").write_text(
        f'[tool.searchlab]\ndata_dir = "{data_dir.resolve()}"\n'
    )
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in (
        "SEARCHLAB_HOME",
        "SEARCHLAB_DATA_DIR",
        "SEARCHLAB_STORAGE",
        "MLFLOW_TRACKING_URI",
        "KERAS_HOME",
        "CIFAR_VGG_WEIGHTS",
        "CIFAR_VGG_INPUT_SIZE",
        "CIFAR_VGG_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)

    def offline(fname, origin, *args, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    return project


def _cli(*args: object, env: dict[str, str] | None = None):
    from click.testing import CliRunner

    from searchlab.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_doctor_reports_the_missing_weights_and_data_of_cifar_vgg(fresh: Path) -> None:
    result = _cli("doctor", "studies/cifar_vgg.py")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"(from pyproject.toml [tool.searchlab] at {fresh / 'pyproject.toml'})" in out
    assert "warn  backbone        VGG16's ImageNet weights are not in " in out
    assert "run `CIFAR_VGG_WEIGHTS=none searchlab run studies/cifar_vgg.py`" in out
    assert "ready if online: a run downloads what the warn lines name (backbone)" in out
    assert "ready: nothing a run needs is missing" not in out
    assert not (fresh / ".searchlab").exists(), "doctor writes nothing"

    # the data: a data directory without CIFAR-10
    (fresh / "empty").mkdir()
    out = _cli("doctor", "studies/cifar_vgg.py", "--data-dir", fresh / "empty").output
    assert "warn  study data      cifar10: no cifar10.npz" in out and "offline: put" in out
    assert "(backbone, study data)" in out or "(study data, backbone)" in out
    # the environment variable the study reads, named where it gave the value
    out = _cli("doctor", "studies/cifar_vgg.py", env={"CIFAR_VGG_WEIGHTS": "none"}).output
    assert (
        "ok    backbone        vgg16, random fixed weights (seed 0), from $CIFAR_VGG_WEIGHTS" in out
    )
    missing = _cli("doctor", "studies/cifar_vgg.py", env={"CIFAR_VGG_WEIGHTS": "/no/w.h5"})
    assert missing.exit_code == 1 and "FAIL  backbone        Backbone weights file /no/w.h5" in (
        missing.output
    )


def test_a_configured_data_directory_that_does_not_exist_is_one_line(fresh: Path) -> None:
    (fresh / "pyproject.toml").write_text('[tool.searchlab]\ndata_dir = "nowhere"\n')
    line = _error_line(_cli("run", "studies/cifar_vgg.py"))
    assert line == (
        f"error: The data directory {fresh / 'nowhere'} (from pyproject.toml [tool.searchlab] at "
        f"{fresh / 'pyproject.toml'}) does not exist: create it and put the datasets there, or "
        "change that setting."
    )
    assert not (fresh / ".searchlab").exists()


X_Y_MISMATCH = """
import numpy as np
import keras
from searchlab import Dataset, Int, Study

def arrays():
    x = np.zeros((40, 4), "float32")
    return x, np.arange(30) % 2, x[:10], np.arange(10) % 2

def build(params):
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m

study = Study(name="mismatch", space={"units": Int(1, 4)}, model=build,
              data=Dataset(loader=arrays), trials=2, epochs=1)
"""


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("weights", "this study takes them from $CIFAR_VGG_WEIGHTS"),
        ("data", "'cifar10' not found locally"),
        ("study", "syntax error"),
        ("store", "Cannot reach the MLflow tracking server"),
        ("x_y", "gives 40 train inputs but labels with 30 rows"),
    ],
)
def test_a_run_that_cannot_train_writes_nothing(fresh: Path, failure: str, message: str) -> None:
    args: list[object] = ["run", "studies/cifar_vgg.py"]
    if failure == "data":
        (fresh / "empty").mkdir()
        args += ["--data-dir", fresh / "empty"]
    elif failure == "study":
        (fresh / "studies" / "broken.py").write_text("study = Study(\n")
        args = ["run", "studies/broken.py"]
    elif failure == "store":
        args += ["--tracking-uri", "http://127.0.0.1:9"]
    elif failure == "x_y":
        (fresh / "studies" / "mismatch.py").write_text(X_Y_MISMATCH)
        args = ["run", "studies/mismatch.py"]
    env = {"CIFAR_VGG_WEIGHTS": "none"} if failure != "weights" else None
    assert message in _error_line(_cli(*args, env=env))
    assert not (fresh / ".searchlab").exists(), "no store, no session, no pinned settings"


@pytest.mark.slow
def test_the_mission_command_fails_once_with_its_fix_then_trains_and_exports(fresh: Path) -> None:
    """The done-when of issue 26: offline on a fresh home, ``searchlab run
    studies/cifar_vgg.py`` stops with one line naming the exact fix; after that fix the
    same command trains (``--try`` first, then the real study, small) without
    ``--allow-changed-settings``; the try leaves the real study untouched; ``export``
    needs no variable set again."""
    line = _error_line(_cli("run", "studies/cifar_vgg.py"))
    assert "run `CIFAR_VGG_WEIGHTS=none searchlab run studies/cifar_vgg.py`" in line
    assert not (fresh / ".searchlab").exists()

    fixed = {"CIFAR_VGG_WEIGHTS": "none"}
    small = ["--subset", "200,50"]
    tried = _cli("run", "studies/cifar_vgg.py", "--try", *small, env=fixed)  # in a worker
    assert tried.exit_code == 0, tried.output
    assert tried.output.startswith(
        "try run: 2 trials x 1 epoch on 200 train / 50 validation rows in the throwaway "
        "study 'cifar-vgg16-try', started over; the real study 'cifar-vgg16' is untouched.\n"
    ), tried.output
    assert "trial 2 of 2" in tried.output
    storage = config.default_storage()
    assert study_names(storage) == ["cifar-vgg16-try"]

    real = _cli(
        "run",
        "studies/cifar_vgg.py",
        "--trials",
        1,
        "--epochs",
        1,
        *small,
        "--in-process",
        env=fixed,
    )
    assert real.exit_code == 0, real.output
    assert StudyStore.load("cifar-vgg16", storage).count() == 1, "no trial of the try in it"

    again = _cli("run", "studies/cifar_vgg.py", "--try", *small, "--in-process", env=fixed)
    assert again.exit_code == 0, again.output
    assert StudyStore.load("cifar-vgg16-try", storage).count() == 2, "the try started over"
    trial_runs = [
        r
        for r in mlflow_runs(config.default_tracking_uri(), "cifar-vgg16-try")
        if r.data.tags.get("searchlab.role") != "session"
    ]
    assert len(trial_runs) == 2, "the earlier try's runs are gone from the experiment"
    assert StudyStore.load("cifar-vgg16", storage).count() == 1

    # export with CIFAR_VGG_WEIGHTS unset: the study's stored backbone settings are used
    exported = _cli("export", "studies/cifar_vgg.py", "-o", "best.h5")
    assert exported.exit_code == 0, exported.output
    assert (fresh / "best.h5").stat().st_size > 0


def test_export_rebuilds_the_backbone_the_study_trained_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from searchlab.models import Transfer

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    now = Transfer("vgg16", seed=1)  # the study file as it reads today: ImageNet
    twin = now.as_trained({"weights": "random (seed 7)", "backbone": "vgg16"})
    assert (twin.weights, twin.seed, twin.trained) == (None, 7, True)
    assert (now.weights, now.seed, now.trained) == ("imagenet", 1, False)
    assert twin.settings()["weights"] == "random (seed 7)"

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://x: None -- [Errno -3] name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    trained = Transfer("vgg16", weights=None).as_trained({"weights": "imagenet"})
    with pytest.raises(StudyDefinitionError) as caught:
        trained.fetch_weights((32, 32, 3))
    assert str(caught.value).endswith(
        "the study trained with them and its frozen backbone is rebuilt from them: put "
        f"vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 in {tmp_path}."
    )
