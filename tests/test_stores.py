"""Bad or unreachable stores, and a stored study with another space: one line before any
training, exit 1, nothing written."""

from __future__ import annotations

from pathlib import Path

from reliability_helpers import write_study


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unreachable_postgres_storage(cli, project: Path) -> None:
    line = _one_error_line(
        cli("run", write_study(project), "--storage", "postgresql://u:secret@127.0.0.1:1/db")
    )
    assert "Cannot open the Optuna storage postgresql://u:***@127.0.0.1:1/db" in line
    assert "secret" not in line


def test_unreachable_tracking_server(cli, project: Path) -> None:
    line = _one_error_line(
        cli("run", write_study(project), "--tracking-uri", "http://127.0.0.1:1")
    )
    assert "Cannot reach the MLflow tracking server http://127.0.0.1:1" in line
    assert not (project / ".searchlab" / "optuna.db").exists(), "nothing written"


def test_same_name_different_space_is_refused_before_anything_is_written(
    cli, project: Path
) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    study = write_study(project)
    home = project / ".searchlab"
    home.mkdir()
    storage = f"sqlite:///{home / 'optuna.db'}"
    # the storage holds "tiny" with another space (as another project's study would)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    other = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    other.set_user_attr("searchlab.space", {"units": "int [1, 4]", "_objective": "val_accuracy"})
    line = _one_error_line(cli("run", study))
    assert "already holds a study named 'tiny' with a different space" in line
    assert "differs in: learning_rate, units" in line
    assert optuna.load_study(study_name="tiny", storage=storage).trials == []
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_experiment_by_name("tiny") is None
