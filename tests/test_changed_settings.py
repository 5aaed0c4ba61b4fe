"""Resuming a study with settings that change results (epochs, subset, the data, the
backbone) would mix incomparable trials: it is refused in one line that names what changed
and the way out, or continued with ``--allow-changed-settings``, which tags the session."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from searchlab import config
from searchlab.errors import StudyDefinitionError
from searchlab.store import SPACE_ATTR, StudyStore
from tests.conftest import mlflow_runs

TINY = """
from searchlab import Choice, Dataset, Study
from searchlab.models import dense_classifier

study = Study(name="tiny-settings", space={"units": Choice([8, 16, 32, 64])},
              model=dense_classifier, data=Dataset("mnist", subset={"train": 200, "val": 100}),
              strategy="grid", trials=None, epochs=1, seed=0)
"""


def _sessions() -> list:
    runs = mlflow_runs(config.default_tracking_uri(), "tiny-settings")
    return [r for r in runs if r.data.tags.get("searchlab.role") == "session"]


@pytest.mark.slow
def test_resuming_with_changed_epochs_or_subset_is_refused_in_one_line(cli, project: Path):
    study = project / "tiny.py"
    study.write_text(TINY)
    first = cli("run", study, "--trials", "1", "--in-process")
    assert first.exit_code == 0, first.output

    more_epochs = cli("run", study, "--trials", "2", "--epochs", "2", "--in-process")
    assert more_epochs.exit_code == 1
    (line,) = more_epochs.output.strip().splitlines()
    assert line.startswith(
        "error: Study 'tiny-settings' was run with other settings (epochs 1 -> 2)"
    )
    assert "Start a new study" in line and "--allow-changed-settings" in line

    other_subset = cli("run", study, "--trials", "2", "--subset", "300,100", worker=True)
    assert other_subset.exit_code == 1
    (line,) = other_subset.output.strip().splitlines()
    assert "data_digest " in line and "subset train=200,val=100 -> train=300,val=100" in line
    assert len(_sessions()) == 1  # the refused runs wrote nothing

    allowed = cli(
        "run", study, "--trials", "2", "--epochs", "2", "--in-process", "--allow-changed-settings"
    )
    assert allowed.exit_code == 0, allowed.output
    assert "trial 2 of 2" in allowed.output
    first_session, second_session = _sessions()
    assert "searchlab.changed_settings" not in first_session.data.tags
    assert second_session.data.tags["searchlab.changed_settings"] == "epochs 1 -> 2"
    assert second_session.data.params["epochs"] == "2"
    # the study goes on with the settings it was allowed to take
    again = cli("run", study, "--trials", "3", "--epochs", "2", "--in-process")
    assert again.exit_code == 0, again.output
    assert "searchlab.changed_settings" not in _sessions()[-1].data.tags


def test_the_store_keeps_the_settings_with_the_space(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def open_(settings, allow=False):
        return StudyStore.open(
            "s",
            url,
            direction="maximize",
            described={"a": "int [1, 3]", "_objective": "val_accuracy"},
            sampler=optuna.samplers.RandomSampler(),
            settings=settings,
            allow_changed_settings=allow,
        )

    # a study stored before searchlab kept settings takes the first ones it is opened with
    old = open_(None)
    old.set_attr(SPACE_ATTR, {"a": "int [1, 3]", "_objective": "val_accuracy"})
    assert open_({"epochs": "1", "subset": "all"}).changed_settings == {}
    first = open_({"epochs": "1", "subset": "all"})
    assert first.changed_settings == {}
    first.ostudy.enqueue_trial({"a": 1})  # settings are pinned once a trial of them exists
    with pytest.raises(StudyDefinitionError, match=r"\(epochs 1 -> 2\)"):
        open_({"epochs": "2", "subset": "all"})
    moved = open_({"epochs": "2", "subset": "all"}, allow=True)
    assert moved.changed_settings == {"epochs": ("1", "2")}
    assert open_({"epochs": "2", "subset": "all"}).changed_settings == {}  # kept from now on
    assert moved.ostudy.metric_names == ["val_accuracy"]
