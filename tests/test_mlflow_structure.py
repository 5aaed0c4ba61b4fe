"""The MLflow and Optuna structure of a session is what it was: names of tags, params,
metrics (with their steps) and artifacts of the parent run and of each trial run, and the
Optuna study's and trials' attribute names, for both engines and the pruned and failed
paths.  ``tests/golden/structure.json`` was written by main before the core redesign
(``SEARCHLAB_WRITE_GOLDEN=1`` writes it again; review that diff like code).

Values that differ from run to run (ids, times, hosts, pids) are not compared; names are.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from searchlab import config
from searchlab.tracking import client
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "structure.json"
#: keys that name one session (its run id) or one machine: replaced by a placeholder
VARIABLE = re.compile(r"^(searchlab\.session\.)[0-9a-f]{32}$")
#: MLflow's git tags are there when the study file is in a git checkout (with a branch, a
#: remote): the checkout's, not searchlab's, so they are not compared
CHECKOUT = "mlflow.source.git."


def _names(keys: Any) -> list[str]:
    return sorted(VARIABLE.sub(r"\1<run_id>", k) for k in keys if not k.startswith(CHECKOUT))


def _artifacts(c: Any, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for item in c.list_artifacts(run_id, path):
        if item.is_dir:
            out += _artifacts(c, run_id, item.path)
        else:
            out.append(item.path)
    return sorted(out)


def structure(study_name: str) -> dict[str, Any]:
    import optuna

    from searchlab.store import open_storage

    c = client(config.default_tracking_uri())
    exp = c.get_experiment_by_name(study_name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("searchlab.role") == "session"]
    children = sorted(
        (r for r in runs if "searchlab.trial" in r.data.tags),
        key=lambda r: int(r.data.tags["searchlab.trial"]),
    )

    def logged_models(run: Any) -> list[dict[str, Any]]:
        outputs = run.outputs.model_outputs if run.outputs else []
        models = [c.get_logged_model(o.model_id) for o in outputs]
        return [
            {
                "name": m.name,
                "tags": _names(k for k in m.tags if not k.startswith("mlflow.")),
                "files": sorted(a.path for a in c.list_logged_model_artifacts(m.model_id)),
            }
            for m in models
        ]

    def run_shape(run: Any) -> dict[str, Any]:
        return {
            "status": run.info.status,
            "tags": _names(run.data.tags),
            "params": _names(run.data.params),
            "metrics": {
                k: sorted(m.step for m in c.get_metric_history(run.info.run_id, k))
                for k in sorted(run.data.metrics)
            },
            "artifacts": _artifacts(c, run.info.run_id),
            "logged_models": logged_models(run),
            "inputs": sorted(
                [d.dataset.name, *(f"{t.key}={t.value}" for t in d.tags)]
                for d in (run.inputs.dataset_inputs if run.inputs else [])
            ),
            "run_name": re.sub(r"\d", "9", run.info.run_name or ""),
        }

    ostudy = optuna.load_study(
        study_name=study_name, storage=open_storage(config.default_storage())
    )
    return {
        "experiment_tags": _names(exp.tags),
        "sessions": [run_shape(r) for r in parents],
        "trials": [{**run_shape(r), "state": r.data.tags["searchlab.state"]} for r in children],
        "optuna_study_attrs": _names(ostudy.user_attrs),
        "optuna_trials": [
            {
                "state": t.state.name,
                "attrs": _names(t.user_attrs),
                "params": sorted(t.params),
                "steps": sorted(t.intermediate_values),
            }
            for t in ostudy.trials
        ],
    }


FAILING_STUDY = """
import keras
from searchlab import Choice, Dataset, Study


def build(params, info):
    if params["units"] == 13:
        raise RuntimeError("this configuration cannot be built")
    model = keras.Sequential([
        keras.Input(info.input_shape), keras.layers.Flatten(),
        keras.layers.Dense(params["units"], activation="relu"),
        keras.layers.Dense(info.num_classes, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


study = Study(
    name="shape-{engine}", space={{"units": Choice([8, 13, 16])}}, model=build,
    data=Dataset("mnist", validation=0.1, subset={{"train": 300, "val": 100}}),
    objective="val_accuracy", direction="maximize", strategy="grid", epochs=2, seed=0,
)
"""

CASES = {
    # the recycling worker path (the default), pruning on: pruned, complete and failed trials
    "optuna-worker": ("optuna", ("--pruner", "median", "--prune-min-epochs", "1")),
    "optuna-in-process": ("optuna", ("--in-process",)),
    "keras-tuner": ("keras-tuner", ()),
}
#: transfer studies (random VGG16 weights): a cached one-phase trial and a two-phase one
TRANSFER = {
    "vgg-cached": "cifar_vgg.py",
    "vgg-finetune": "cifar_vgg_finetune.py",
}


def _shapes(cli, project: Path, engine: str, extra: tuple[str, ...]) -> dict[str, Any]:
    study = project / "shape.py"
    study.write_text(FAILING_STUDY.format(engine=engine))
    worker = "--in-process" not in extra  # the worker case runs as users' runs do
    result = cli("run", study, "--engine", engine, *extra, worker=worker)
    assert result.exit_code == 0, result.output
    shapes = {"failing-grid": structure(f"shape-{engine}")}
    result = cli(
        "run",
        STUDIES / "mnist_dense.py",
        "--engine",
        engine,
        "--strategy",
        "random",
        "--trials",
        "2",
        "--epochs",
        "2",
        "--subset",
        "300,100",
        *extra,
        worker=worker,
    )
    assert result.exit_code == 0, result.output
    shapes["mnist-random"] = structure("mnist-dense")
    return shapes


@pytest.mark.parametrize("case", sorted(CASES))
def test_structure_is_unchanged(cli, project: Path, case: str) -> None:
    engine, extra = CASES[case]
    got = _shapes(cli, project, engine, extra)
    if os.environ.get("SEARCHLAB_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        golden[case] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())[case]
    assert got == expected


@pytest.mark.parametrize("case", sorted(TRANSFER))
def test_transfer_structure_is_unchanged(
    cli, project: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    from searchlab.study import load_study

    monkeypatch.setenv("CIFAR_VGG_WEIGHTS", "none")
    path = STUDIES / TRANSFER[case]
    result = cli(
        "run",
        path,
        "--strategy",
        "random",
        "--trials",
        "2",
        "--epochs",
        "1",
        "--subset",
        "64,32",
        "--in-process",
    )
    assert result.exit_code == 0, result.output
    got = {"random": structure(load_study(path).name)}
    if os.environ.get("SEARCHLAB_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        golden[case] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())[case]
