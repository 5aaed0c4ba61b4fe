"""Bad or unreachable stores, and a stored study with another space: one line before any
training, exit 1, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    line = _one_error_line(cli("run", write_study(project), "--tracking-uri", "http://127.0.0.1:1"))
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


def _schema(db: Path) -> list[tuple]:
    """Every table and index with its definition's lines in sorted order: MLflow's own
    migrations write a table's constraints in an order that varies from process to process."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        objects = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    lines = [
        (kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
        for kind, name, sql in objects
    ]
    return [*lines, *version]


def test_a_new_tracking_store_is_a_copy_of_one_mlflow_migrated(tmp_path: Path, monkeypatch) -> None:
    """The first new SQLite store of an MLflow version is migrated (once) into the template
    folder; later ones copy it, run no migration, and are what MLflow itself creates."""
    import mlflow.store.db.utils as db_utils
    from mlflow.tracking import MlflowClient

    from searchlab import tracking

    monkeypatch.setenv("SEARCHLAB_STORE_TEMPLATES", str(tmp_path / "templates"))
    monkeypatch.chdir(tmp_path)
    tracking.client(f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}")
    assert list((tmp_path / "templates").glob("mlflow-*-empty.db"))

    migrations = []
    initialize = db_utils._initialize_tables
    monkeypatch.setattr(
        db_utils, "_initialize_tables", lambda engine: (migrations.append(1), initialize(engine))[1]
    )
    copied = tmp_path / "second" / "mlflow.db"
    client = tracking.client(f"sqlite:///{copied}")
    assert migrations == []
    MlflowClient(f"sqlite:///{tmp_path / 'mlflows_own.db'}").search_experiments()
    assert migrations == [1]
    assert _schema(copied) == _schema(tmp_path / "mlflows_own.db")

    default = client.get_experiment("0")  # added on opening, with this store's root
    assert "templates" not in default.artifact_location
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "val_accuracy", 0.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.5}


def test_a_store_is_created_as_before_when_there_is_no_template_folder(
    tmp_path: Path, monkeypatch
) -> None:
    from searchlab import tracking

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("SEARCHLAB_STORE_TEMPLATES", str(tmp_path / "not-a-folder"))
    monkeypatch.chdir(tmp_path)
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment("0").name == "Default"
    assert (tmp_path / "mlflow.db").is_file()
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))


def test_a_password_is_hidden_as_given_and_url_decoded() -> None:
    from searchlab.errors import hide_password

    for url in ("postgresql://u:s%40cret@db:5432/optuna", "https://u:s%40cret@mlflow.example"):
        said = hide_password(f"refused {url} for 's@cret' and s%40cret", url)
        assert "cret" not in said and said.count("***") == 3
    assert hide_password("no secret here", "sqlite:///x.db") == "no secret here"


def test_run_status_tells_a_missing_run_from_a_store_that_cannot_answer(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from searchlab.errors import StoreError
    from searchlab.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    tracker.connect()
    assert tracker.run_status("no-such-run") is None

    def broken(run_id: str) -> None:
        raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    tracker._mlflow._inner.get_run = broken  # the store goes away under a live tracker
    with pytest.raises(StoreError, match="refused get_run: database is locked"):
        tracker.run_status("any-run")
