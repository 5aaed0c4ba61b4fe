"""The keras-tuner engine: same trials, same MLflow structure and same export as Optuna's;
KerasTuner-style study files on both engines; no tensorboard needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TINY = """
from searchlab import Choice, Dataset, Float, Study
from searchlab.models import dense_classifier

study = Study(
    name="tiny",
    space={
        "units": Choice([8, 16]),
        "learning_rate": Float(1e-3, 1e-2, log=True, grid=[3e-3]),
    },
    model=dense_classifier,
    data=Dataset("mnist", subset={"train": 256, "val": 128}),
    strategy="random",
    trials=2,
    epochs=1,
    batch_size=64,
)
"""

# Written like KerasTuner's getting-started guide: nothing searchlab-specific in build_model.
GETTING_STARTED = """
import keras
from keras import layers

from searchlab import Dataset, Study


def build_model(hp):
    model = keras.Sequential()
    model.add(layers.Flatten())
    # Tune the number of layers.
    for i in range(hp.Int("num_layers", 1, 2)):
        model.add(
            layers.Dense(
                # Tune number of units separately.
                units=hp.Int(f"units_{i}", min_value=16, max_value=64, step=16),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


study = Study(
    name="getting-started",
    space=None,
    model=build_model,
    data=Dataset("mnist", subset={"train": 256, "val": 128}),
    trials=1,
    epochs=1,
    batch_size=64,
)
"""


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Make ``import tensorboard`` fail, as on the TensorFlow CPU wheel."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)


def test_the_tensorboard_block_breaks_keras_tuners_own_tuner(no_tensorboard):
    """The hazard is real: keras-tuner's Tuner imports tensorboard in each trial."""
    import keras
    import keras_tuner as kt

    if keras.backend.backend() != "tensorflow":
        pytest.skip("keras-tuner imports tensorboard only on the TensorFlow backend")
    with pytest.raises(ImportError):
        kt.engine.tuner.Tuner._configure_tensorboard_dir(None, [], None)


def _structure(name: str, home: Path) -> dict:
    from searchlab.tracking import MlflowTracker, client
    from tests.conftest import mlflow_runs

    tracker = MlflowTracker(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow_runs(tracker.uri, name)
    parents = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}

    def arts(run_id: str, path: str | None = None) -> list[str]:
        out = []
        for a in client(tracker.uri).list_artifacts(run_id, path):
            out += arts(run_id, a.path) if a.is_dir else [a.path]
        return sorted(out)

    def tag_keys(tags):  # engine-specific extras live under searchlab.kt.*
        return tuple(
            sorted(
                k for k in tags if k.startswith("searchlab.") and not k.startswith("searchlab.kt.")
            )
        )

    return {
        "parent": (
            parent.info.status,
            tag_keys(parent.data.tags),
            tuple(sorted(parent.data.params)),
            tuple(sorted(parent.data.metrics)),
            tuple(arts(parent.info.run_id)),
            tuple(m.model_id[:2] for m in parent.outputs.model_outputs),  # the best model
        ),
        "children": sorted(
            (
                c.info.run_name,
                c.info.status,
                c.data.tags["searchlab.state"],
                tag_keys(c.data.tags),
                tuple(sorted(c.data.params)),
                tuple(sorted(c.data.metrics)),
                tuple(arts(c.info.run_id)),
            )
            for c in children
        ),
        "engine": parent.data.tags["searchlab.engine"],
        "child_engines": {c.data.tags["searchlab.engine"] for c in children},
    }


STRATEGIES = ("grid", "random", "bayesian", "hyperband")


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory, data_dir):
    """Every strategy on both engines, one project folder (stores set up once), in-process."""
    from click.testing import CliRunner

    from searchlab.cli import main
    from tests.conftest import in_process

    project = tmp_path_factory.mktemp("engines")
    runner = CliRunner()
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("SEARCHLAB_HOME", str(project / ".searchlab"))
        mp.setenv("SEARCHLAB_DATA_DIR", str(data_dir))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("SEARCHLAB_STORAGE", raising=False)
        mp.setitem(sys.modules, "tensorboard", None)  # as on the TensorFlow CPU wheel
        for strategy in STRATEGIES:
            for engine in ("optuna", "keras-tuner"):
                name = f"tiny-{strategy}-{engine}"
                study_file = project / f"{name}.py"
                study_file.write_text(TINY.replace('name="tiny"', f"name={name!r}"))
                run = runner.invoke(
                    main,
                    in_process(("run", study_file, "--strategy", strategy, "--engine", engine)),
                    catch_exceptions=False,
                )
                out = project / f"{name}.h5"
                export = runner.invoke(
                    main, ["export", str(study_file), "-o", str(out)], catch_exceptions=False
                )
                outputs[name] = (run, export, out)
    return project, outputs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_engines_give_the_same_mlflow_structure(strategy, both_engines):
    project, outputs = both_engines
    got = {}
    for engine in ("optuna", "keras-tuner"):
        name = f"tiny-{strategy}-{engine}"
        run, export, out = outputs[name]
        assert run.exit_code == 0, run.output
        assert "2 complete, 0 pruned, 0 failed" in run.output
        assert export.exit_code == 0, export.output
        assert out.stat().st_size > 0
        got[engine] = _structure(name, project / ".searchlab")
    optuna_s, kt_s = got["optuna"], got["keras-tuner"]
    assert (optuna_s["engine"], kt_s["engine"]) == ("optuna", "keras-tuner")
    assert kt_s["child_engines"] == {"keras-tuner"}
    assert optuna_s["parent"] == kt_s["parent"]
    assert optuna_s["children"] == kt_s["children"]
    assert [c[0] for c in kt_s["children"]] == ["trial 1 (#0)", "trial 2 (#1)"]  # as printed
    assert all(
        c[1] == "FINISHED" and c[-1] == ("weights/best.weights.h5",) for c in kt_s["children"]
    )
    assert "trials.csv" in kt_s["parent"][-2] and kt_s["parent"][-1] == ("m-",)


@pytest.mark.slow
def test_keras_tuner_resumes_from_its_state_folder(cli, project, no_tensorboard):
    study_file = project / "tiny.py"
    study_file.write_text(TINY)
    assert cli("run", study_file, "--engine", "keras-tuner", "--trials", "1").exit_code == 0
    oracle_file = project / ".searchlab" / "kerastuner" / "tiny" / "oracle.json"
    assert oracle_file.is_file()
    result = cli("run", study_file, "--engine", "keras-tuner", "--trials", "2")
    assert result.exit_code == 0, result.output
    assert "1 already finished" in result.output and "trial 2 of 2" in result.output
    result = cli("run", study_file, "--engine", "keras-tuner", "--trials", "2")
    assert "trial " not in result.output.replace("trials:", "")  # budget met: nothing re-run
    import keras_tuner as kt

    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"))
    oracle._set_project_dir(str(oracle_file.parent.parent), "tiny")
    oracle.reload()
    assert sorted(t.status for t in oracle.trials.values()) == ["COMPLETED", "COMPLETED"]


@pytest.mark.slow
def test_a_kerastuner_getting_started_study_runs_unchanged_on_both_engines(
    cli, project, monkeypatch, no_tensorboard
):
    import keras

    study_file = project / "getting_started.py"
    study_file.write_text(GETTING_STARTED)
    for engine in ("optuna", "keras-tuner"):
        monkeypatch.setenv("SEARCHLAB_HOME", str(project / f"home-{engine}"))
        result = cli("run", study_file, "--engine", engine)
        assert result.exit_code == 0, result.output
        assert "1 complete, 0 pruned, 0 failed" in result.output
        out = project / f"gs-{engine}.h5"
        assert cli("export", study_file, "-o", out).exit_code == 0
        model = keras.models.load_model(out)
        assert model.predict(keras.ops.zeros((2, 28, 28)), verbose=0).shape == (2, 10)
        units = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        assert 2 <= len(units) <= 3  # 1-2 tuned hidden layers + the classifier
    # hp.Float("lr", ..., sampling="log") is continuous: grid refuses, in one line
    result = cli("run", study_file, "--strategy", "grid")
    assert result.exit_code == 1
    assert "hp.Float('lr', ...)" in result.output and "step=" in result.output


def test_an_optuna_pruner_on_the_keras_tuner_engine_is_one_clear_error(cli, project):
    study_file = project / "tiny.py"
    study_file.write_text(TINY)
    result = cli("run", study_file, "--engine", "keras-tuner", "--pruner", "asha")
    assert result.exit_code == 1
    assert "error: --pruner asha is an Optuna pruner" in result.output
    assert "--strategy hyperband" in result.output


def test_optuna_pruner_settings_on_the_keras_tuner_engine_are_one_clear_error(cli, project):
    study_file = project / "tiny.py"
    study_file.write_text(TINY)
    result = cli(
        "run",
        study_file,
        "--engine",
        "keras-tuner",
        "--strategy",
        "hyperband",
        "--prune-factor",
        "2",
    )
    assert result.exit_code == 1
    assert "error: --prune-min-epochs and --prune-factor set Optuna's pruners" in result.output
