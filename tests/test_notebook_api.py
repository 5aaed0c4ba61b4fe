"""``searchlab.run``: a study run from a notebook, in the notebook's own process.

The slow tests execute ``examples/notebook_api.ipynb`` with nbclient (its builder is
defined in a cell, in ``__main__``) and read its results back, and interrupt a study in
mid-trial as a notebook's interrupt would: nothing is left RUNNING in Optuna or MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mlflow_runs
from conftest import mnist_build_model as build_model

import searchlab
from searchlab import Dataset, Study
from searchlab.api import ProgressBar

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook_api.ipynb"


def _study(name: str, epochs: int = 1) -> Study:
    return Study(
        name=name,
        space=None,
        model=build_model,
        data=Dataset("mnist", subset={"train": 600, "val": 200}),
        strategy="random",
        trials=2,
        epochs=epochs,
    )


@pytest.mark.slow
def test_the_example_notebook_runs_a_study_and_reads_its_results(project) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project)}}
    ).execute()
    printed = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "best trial:" in printed and "'units'" in printed
    runs = mlflow_runs(f"sqlite:///{project / '.searchlab' / 'mlflow.db'}", "notebook-mnist")
    assert len([r for r in runs if "searchlab.trial" in r.data.tags]) == 2
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_run_returns_the_best_trial_and_the_table(project) -> None:
    result = searchlab.run(_study("api-run"), progress=False)
    assert result.best is not None and set(result.best.params) == {"units"}
    table = result.table()
    assert len(table) == 2 and table["value"].max() == pytest.approx(result.best.value)


class _Interrupt(ProgressBar):
    """Interrupts the study after the first epoch of its first trial, as Ctrl-C would."""

    def epoch(self, number, epoch, epochs, logs) -> None:
        raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupt_mid_trial_leaves_nothing_running(project) -> None:
    import optuna

    with pytest.raises(KeyboardInterrupt):
        searchlab.run(_study("api-interrupt", epochs=3), listener=_Interrupt("val_accuracy"))
    storage = f"sqlite:///{project / '.searchlab' / 'optuna.db'}"
    trials = optuna.load_study(study_name="api-interrupt", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL"]
    runs = mlflow_runs(f"sqlite:///{project / '.searchlab' / 'mlflow.db'}", "api-interrupt")
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    # the next run starts afresh and completes the budget
    result = searchlab.run(_study("api-interrupt", epochs=3), progress=False, trials=2)
    assert result.summary["n_complete"] == 2


@pytest.mark.slow
def test_a_studys_callbacks_reach_each_trials_fit(project) -> None:
    import keras

    class Count(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None) -> None:
            Count.epochs += 1

    # nothing improves the loss by 100: patience 0 stops each trial after its second epoch
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=100, patience=0)
    study = Study(
        name="callbacks",
        space={"units": searchlab.Int(16, 64, step=16)},
        model=lambda params: build_model(_Fixed(params)),
        data=Dataset("mnist", subset={"train": 600, "val": 200}),
        trials=2,
        epochs=5,
        callbacks=[stop, Count()],
    )
    result = searchlab.run(study, progress=False)
    assert result.summary["n_complete"] == 2 and Count.epochs == 4
    assert set(result.table()["epochs"]) == {2}


class _Fixed:
    """``hp`` for ``build_model`` from a params dict."""

    def __init__(self, params) -> None:
        self.params = params

    def Int(self, name, *args, **kwargs):  # noqa: N802 - KerasTuner's name
        return self.params[name]


def test_callbacks_must_be_keras_callbacks(project) -> None:
    with pytest.raises(searchlab.StudyDefinitionError, match="not a Keras callback"):
        Study(name="x", space=None, model=build_model, data="mnist", callbacks=[print])
