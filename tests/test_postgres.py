"""Many machines: three workers against a real PostgreSQL storage and an ``mlflow server``
(backed by PostgreSQL too), as the README's multi-machine set-up; a wrong password fails in
one line; passwords in both URLs show nowhere (output, ``ps``, the stores, files).

Needs ``$SEARCHLAB_TEST_POSTGRES_URL`` (a role that may create databases), as
``scripts/ci_postgres.sh start`` prints.  Without it the tests skip; with
``$SEARCHLAB_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) a skip is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_helpers import (
    BARRIER,
    Session,
    check_consistent,
    env_for,
    searchlab_cmd,
    write_study,
    write_study_with,
)

URL_ENV = "SEARCHLAB_TEST_POSTGRES_URL"


def _unavailable(reason: str) -> None:
    if os.environ.get("SEARCHLAB_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL is required here (SEARCHLAB_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """Two fresh databases (Optuna, MLflow) on the test server; dropped afterwards."""
    url = os.environ.get(URL_ENV)
    if not url:
        _unavailable(f"no PostgreSQL server: set {URL_ENV} (scripts/ci_postgres.sh start)")
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed: pip install 'searchlab[postgres]'")
    try:
        admin = psycopg.connect(url, connect_timeout=10, autocommit=True)
    except Exception as exc:
        _unavailable(f"cannot connect to {URL_ENV}: {str(exc).strip().splitlines()[0]}")
    suffix = uuid.uuid4().hex[:8]
    names = {"optuna": f"sl_optuna_{suffix}", "mlflow": f"sl_mlflow_{suffix}"}
    base = url.rsplit("/", 1)[0]
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {"base": base, **{k: f"{base}/{v}" for k, v in names.items()}}
    finally:
        with admin.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(postgres: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        postgres["mlflow"],
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
        "--workers",
        "1",
    ]
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()
                )
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_three_workers_on_postgres_and_an_mlflow_server(
    project: Path, postgres: dict[str, str], mlflow_server: str
) -> None:
    study = write_study_with(project, BARRIER)  # every worker holds a trial before any ends
    barrier = project / "barrier"
    barrier.mkdir()
    budget = 5
    s = Session(
        searchlab_cmd(
            study,
            "--trials",
            budget,
            "--workers",
            3,
            "--storage",
            postgres["optuna"],
            "--tracking-uri",
            mlflow_server,
        ),
        env_for(
            project / ".searchlab", SEARCHLAB_TEST_BARRIER=str(barrier), SEARCHLAB_TEST_WORKERS="3"
        ),
        project,
    )
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "trials: 5 complete" in out, out
    found = check_consistent(postgres["optuna"], mlflow_server, "tiny", budget)
    assert len(found["trials"]) == budget
    (session,) = found["sessions"]
    assert session.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in found["trial_runs"]} == {session.info.run_id}
    per_worker = Counter(r.data.tags["searchlab.worker"] for r in found["trial_runs"])
    assert set(per_worker) == {"1/3", "2/3", "3/3"}, per_worker  # each ran a trial (BARRIER)
    assert sum(per_worker.values()) == budget
    # three processes shared the PostgreSQL storage, not one under three labels
    assert len({t.user_attrs["searchlab.pid"] for t in found["trials"]}) >= 3
    # artifacts went through the server: the best model is on the session run
    from mlflow.tracking import MlflowClient

    paths = {a.path for a in MlflowClient(mlflow_server).list_artifacts(session.info.run_id)}
    assert "trials.csv" in paths
    model_id = session.data.tags["searchlab.model_uri"].removeprefix("models:/")
    assert MlflowClient(mlflow_server).get_logged_model(model_id).source_run_id == (
        session.info.run_id
    )


def test_wrong_password_is_one_line_and_writes_nothing(
    cli, project: Path, postgres: dict[str, str]
) -> None:
    study = write_study(project)
    base = postgres["optuna"]
    scheme, rest = base.split("://", 1)
    user, host = rest.split("@", 1)
    wrong = f"{scheme}://{user.split(':')[0]}:not-the-password@{host}"
    import optuna
    from mlflow.tracking import MlflowClient

    before = optuna.get_all_study_names(postgres["optuna"])
    result = cli("run", study, "--storage", wrong)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: Cannot open the Optuna storage")
    assert "password authentication failed" in lines[0]
    assert "not-the-password" not in lines[0]
    assert optuna.get_all_study_names(postgres["optuna"]) == before
    tracking = MlflowClient(f"sqlite:///{project / '.searchlab' / 'mlflow.db'}")
    assert tracking.get_experiment_by_name("tiny") is None


#: the worker command line of the guide's SLURM and Kubernetes recipes, run here as is
RECIPE_WORKER = 'searchlab run "$STUDY_FILE" --trials "$TRIALS"'


@pytest.mark.slow
def test_the_cluster_recipe_runs_identical_workers_as_one_session(
    project: Path, postgres: dict[str, str], mlflow_server: str
) -> None:
    from reliability_helpers import STUDY

    guide = (Path(__file__).resolve().parent.parent / "docs" / "many-machines.md").read_text()
    assert guide.count(RECIPE_WORKER) >= 2, "the SLURM and Kubernetes recipes run this line"
    study = project / "array_study.py"
    study.write_text(STUDY.replace('name="tiny"', 'name="tiny-array"'))
    budget, workers, key = 5, 3, "array-1234"
    env = env_for(
        project / ".searchlab",
        STUDY_FILE=str(study),
        TRIALS=str(budget),
        SEARCHLAB_STORAGE=postgres["optuna"],
        MLFLOW_TRACKING_URI=mlflow_server,
        SEARCHLAB_SESSION=key,
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    procs = [
        subprocess.Popen(
            ["bash", "-c", RECIPE_WORKER],
            env=env,
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(workers)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    found = check_consistent(postgres["optuna"], mlflow_server, "tiny-array", budget)
    assert len(found["trials"]) == budget  # every trial ran once: none failed or repeated
    (session,) = found["sessions"]  # one parent run for every worker
    assert session.info.status == "FINISHED"
    assert session.data.tags["searchlab.session_key"] == key
    assert {r.data.tags["mlflow.parentRunId"] for r in found["trial_runs"]} == {session.info.run_id}
    assert session.data.metrics["n_complete"] == budget
    assert session.data.metrics["session_complete"] == budget  # counted over every worker
    closers = [out for out in outputs if "best model: models:/" in out]
    assert len(closers) == 1, outputs  # the last worker closed it, the others left it open
    assert sum("goes on in its other processes" in out for out in outputs) == workers - 1
    assert session.data.tags["searchlab.model_uri"].startswith("models:/m-")

    late = subprocess.run(
        ["bash", "-c", RECIPE_WORKER],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert late.returncode == 0, late.stdout + late.stderr
    assert f"Session {key!r} of study 'tiny-array' is over" in late.stdout


def _started_by(root: int) -> str:
    """The command lines of every process ``root`` started (its children, theirs, ...), as
    ``ps`` shows them to any user of the machine; ``root``'s own is the user's."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def under(pid: int) -> bool:
        while pid in parents and pid > 1:
            pid = parents[pid]
            if pid == root:
                return True
        return False

    out = []
    for pid in filter(under, parents):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        out.append(f"{pid} " + raw.replace(b"\0", b" ").decode(errors="replace"))
    return "\n".join(out)


def _dump(url: str) -> str:
    """Every row of every table of a database, as text."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    text = []
    with engine.connect() as conn:
        for table in sqlalchemy.inspect(conn).get_table_names():
            for row in conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')):
                text.append(f"{table}: {tuple(row)}")
    engine.dispose()
    return "\n".join(text)


@pytest.mark.slow
def test_no_password_shows_anywhere(
    project: Path, postgres: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    """Stores with passwords in both URLs -- the Optuna storage and the MLflow store on
    PostgreSQL, then an MLflow server reached as ``http://user:password@...``: the
    passwords appear in nothing searchlab prints, in no process's command line (workers,
    ``mlflow ui``), in neither database and in no file searchlab wrote."""
    from sqlalchemy.engine import make_url

    db_password = make_url(postgres["optuna"]).password
    http_password = f"http-{uuid.uuid4().hex[:10]}"
    assert db_password
    secrets = (db_password, http_password)
    http_uri = mlflow_server.replace("http://", f"http://searchlab:{http_password}@")
    study = project / "secret.py"  # a study of its own: the others' experiment is the server's
    study.write_text(write_study(project).read_text().replace('name="tiny"', 'name="tiny-db"'))
    said: list[str] = []
    seen: list[str] = []

    def watch(s: Session, seconds: float = 600.0) -> None:
        """What `ps` shows while ``s`` runs (its own command line aside: the user's)."""
        deadline = time.monotonic() + seconds
        while s.proc.poll() is None and time.monotonic() < deadline:
            seen.append(_started_by(s.proc.pid))
            time.sleep(0.3)

    def run(args: list[str], env: dict[str, str]) -> Session:
        s = Session([sys.executable, "-m", "searchlab.cli", *args], env, project)
        watch(s)
        return s

    # 1. both URLs in the environment: a run, its report and its export
    env = env_for(
        project / ".searchlab",
        SEARCHLAB_STORAGE=postgres["optuna"],
        MLFLOW_TRACKING_URI=postgres["mlflow"],
    )
    s = run(["run", str(study), "--trials", "2"], env)  # its worker gets them from the launcher
    said.append(s.finish())
    assert s.proc.returncode == 0, said[-1]
    for args in (["report", str(study)], ["export", str(study), "-o", str(project / "b.h5")]):
        s = run(args, env)
        said.append(s.finish())
        assert s.proc.returncode == 0, said[-1]
    # 2. `searchlab ui` on the PostgreSQL store: the mlflow ui it starts is in `ps`
    s = Session(
        [sys.executable, "-m", "searchlab.cli", "ui", str(study), "--port", "0"], env, project
    )
    s.wait_for(lambda line: line.startswith("MLflow UI:"), timeout=180)
    watch(s, seconds=3)  # its server and the server's workers are up
    s.kill(signal.SIGINT)
    said.append(s.finish(timeout=60))
    # 3. the MLflow server with a password in its URL, given as flags (the launcher's own
    #    command line is the user's; every process it starts is checked)
    env = env_for(project / ".searchlab")
    flags = ["--storage", postgres["optuna"], "--tracking-uri", http_uri]
    second = project / "second.py"
    second.write_text(study.read_text().replace('name="tiny"', 'name="tiny-http"'))
    s = run(["run", str(second), "--trials", "1", *flags], env)
    said.append(s.finish())
    assert s.proc.returncode == 0, said[-1]
    s = run(["ui", str(second), "--tracking-uri", http_uri], env)
    said.append(s.finish())
    assert s.proc.returncode == 0, said[-1]
    # 4. mistakes that name the stores: an unreachable server, a wrong database
    host = http_uri.rsplit(":", 1)[0]
    for bad in (f"{host}:9", postgres["mlflow"] + "_missing"):
        s = run(["run", str(study), "--tracking-uri", bad, "--storage", postgres["optuna"]], env)
        said.append(s.finish())
        assert s.proc.returncode == 1 and "error: " in said[-1], said[-1]

    everything = {
        "output": "\n".join(said),
        "ps": "\n".join(seen),
        "optuna storage": _dump(postgres["optuna"]),
        "mlflow store": _dump(postgres["mlflow"]),
        "files": "\n".join(
            p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()
        ),
    }
    assert "MLflow UI: http://" in everything["output"] and "mlflow" in everything["ps"]
    assert "trials: 2 complete" in everything["output"]
    for where, text in everything.items():
        for secret in secrets:
            assert secret not in text, f"a password shows in the {where}"
