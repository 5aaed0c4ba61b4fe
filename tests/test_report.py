"""``searchlab report``, ``searchlab ui``, ``searchlab.results()`` / ``best()`` on a real study.

One small random-search study (4 finished trials; those with units=8 fail on purpose) is run once for the module, in
two sessions, and every test reads it back from its stores.  The browser test drives headless
Chromium through the MLflow UI; it skips without Chromium, except where
``SEARCHLAB_REQUIRE_BROWSER=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import searchlab
from searchlab.cli import main
from tests.conftest import in_process

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
#: the registered model the second session's best model becomes a version of
REGISTERED = "report-best"
PLOT_NAMES = ("optimization_history", "parallel_coordinate", "param_importances", "learning_curves")

STUDY = """
from searchlab import Choice, Dataset, Float, Study
from searchlab.models import dense_classifier


def build(params, info):
    if params["units"] == 8:
        raise ValueError("this width fails on purpose")
    return dense_classifier(params, info)


study = Study(
    name="report-test",
    space={
        "units": Choice([8, 16, 32]),
        "learning_rate": Float(1e-3, 1e-2, log=True),
    },
    model=build,
    data=Dataset("mnist", validation=0.1, subset={"train": 600, "val": 200}),
    strategy="random", trials=4, epochs=2, seed=0,
)
"""


@dataclass(frozen=True)
class Finished:
    folder: Path
    study_file: Path
    storage: str
    tracking_uri: str

    def stores(self) -> list[str]:
        return ["--storage", self.storage, "--tracking-uri", self.tracking_uri]

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "SEARCHLAB_HOME": str(self.folder / ".searchlab"), "PYTHONPATH": path}


def invoke(*args: str, env: dict[str, str] | None = None):
    """``searchlab ARGS`` in this process; a ``run`` runs its trials here too (conftest)."""
    return CliRunner().invoke(main, in_process(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Finished:
    folder = tmp_path_factory.mktemp("report")
    study_file = folder / "report_study.py"
    study_file.write_text(STUDY)
    home = folder / ".searchlab"
    done = Finished(
        folder, study_file, f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}"
    )
    env = {"SEARCHLAB_HOME": str(home), "SEARCHLAB_DATA_DIR": str(data_dir)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        first = invoke("run", study_file, "--trials", "2", *done.stores())
        assert first.exit_code == 0, first.output
        # continues up to 4 trials; its best model is registered (the UI's model page)
        second = invoke("run", study_file, *done.stores(), "--register", REGISTERED)
        assert second.exit_code == 0, second.output
    return done


@pytest.fixture
def env(finished: Finished, monkeypatch: pytest.MonkeyPatch) -> Finished:
    monkeypatch.setenv("SEARCHLAB_HOME", str(finished.folder / ".searchlab"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SEARCHLAB_STORAGE", raising=False)
    return finished


def _ostudy(finished: Finished):
    import optuna

    return optuna.load_study(study_name="report-test", storage=finished.storage)


STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


def _expected_order(finished: Finished) -> list[int]:
    """Complete trials by objective (best first), then pruned, then failed ones by number."""
    from optuna.trial import TrialState

    trials = _ostudy(finished).get_trials()
    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)
    )
    pruned = sorted(t.number for t in trials if t.state == TrialState.PRUNED)
    failed = sorted(t.number for t in trials if t.state == TrialState.FAIL)
    return [t.number for t in complete] + pruned + failed


def _states(finished: Finished) -> dict[int, str]:
    return {t.number: STATES[t.state.name] for t in _ostudy(finished).get_trials()}


def _client(finished: Finished):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=finished.tracking_uri)


def _runs(finished: Finished):
    client = _client(finished)
    exp = client.get_experiment_by_name("report-test")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_public_api_exports_results_and_best() -> None:
    assert {"results", "best"} <= set(searchlab.__all__)
    assert searchlab.results is searchlab.report.results
    assert searchlab.best is searchlab.report.best


@pytest.mark.slow
def test_report_prints_every_trial_best_first(env: Finished) -> None:
    order, states = _expected_order(env), _states(env)
    counts = {state: list(states.values()).count(state) for state in sorted(set(states.values()))}
    assert counts["complete"] >= 2 and counts["failed"] >= 1  # units=8 failed, the study went on
    result = invoke("report", env.study_file, *env.stores())
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    parts = ", ".join(f"{n} {state}" for state, n in counts.items())
    assert f"{len(order)} trials ({parts})" in lines[0]
    assert lines[1].split()[:4] == ["number", "state", "value", "epochs"]
    body = lines[2:]
    assert [int(line.split()[0]) for line in body] == order
    assert [line.split()[1] for line in body] == [states[n] for n in order]


@pytest.mark.slow
def test_csv_and_parquet_round_trip(env: Finished, tmp_path: Path) -> None:
    csv, parquet = tmp_path / "trials.csv", tmp_path / "trials.parquet"
    result = invoke("report", env.study_file, "--csv", csv, "--parquet", parquet, *env.stores())
    assert result.exit_code == 0, result.output
    frame = searchlab.results(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    from_csv = pd.read_csv(csv)
    assert list(from_csv.columns) == list(frame.columns)
    assert from_csv["number"].tolist() == _expected_order(env)
    pd.testing.assert_frame_equal(from_csv, frame, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame)


@pytest.mark.slow
def test_plots_are_written_and_logged_on_the_latest_parent_run(
    env: Finished, tmp_path: Path
) -> None:
    plots = tmp_path / "plots"
    result = invoke("report", env.study_file, "--plots", plots, "--top", "3", *env.stores())
    assert result.exit_code == 0, result.output
    expected = {f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "html")}
    expected.add("plotly.min.js")  # one copy, which every HTML plot loads
    assert {p.name for p in plots.iterdir()} == expected
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000
    for name in expected - {"plotly.min.js"}:
        data = (plots / name).read_bytes()
        assert len(data) > 1000, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert len(data) < 200_000, name  # plotly.js is not inside it
            assert b'<script charset="utf-8" src="plotly.min.js"></script>' in data, name
    # the learning curves' legend lists the trials best first
    import re

    html = (plots / "learning_curves.html").read_text()
    ranks = {}
    for trace in html.split('"name":"Trial')[1:]:  # each curve's trace, up to the next one
        rank = re.search(r'"legendrank":(\d+)', trace)
        ranks[int(re.match(r"\d+", trace).group())] = int(rank.group(1)) if rank else None
    assert sorted(ranks, key=ranks.get) == _expected_order(env)[:3], ranks
    sessions = [r for r in _runs(env) if r.data.tags.get("searchlab.role") == "session"]
    assert len(sessions) == 2
    latest = max(sessions, key=lambda r: r.info.start_time)
    assert latest.info.run_id in result.output
    logged = {Path(a.path).name for a in _client(env).list_artifacts(latest.info.run_id, "plots")}
    assert logged == expected
    first = min(sessions, key=lambda r: r.info.start_time)
    assert not _client(env).list_artifacts(first.info.run_id, "plots")
    ARTIFACTS.mkdir(exist_ok=True)  # kept for a person to look at
    for png in plots.glob("*.png"):
        shutil.copy(png, ARTIFACTS / png.name)


@pytest.mark.slow
def test_learning_curves_show_the_top_trials_per_epoch(env: Finished) -> None:
    from searchlab.store import StudyStore

    ostudy = _ostudy(env)
    top = StudyStore(ostudy, ostudy._storage, "").plot_copy(2)
    with_curves = [t for t in top.get_trials() if t.intermediate_values]
    assert [t.number for t in with_curves] == sorted(_expected_order(env)[:2])
    client = _client(env)
    for t in with_curves:  # the curve is the val metric MLflow holds per epoch; both count
        # epochs trained (1, 2, ...)
        history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_accuracy")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)


@pytest.mark.slow
def test_results_match_what_mlflow_holds(env: Finished) -> None:
    frame = searchlab.results(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    runs = {r.info.run_id: r for r in _runs(env)}
    assert len(frame) == len(_expected_order(env))
    for row in frame.to_dict("records"):
        run = runs[row["run_id"]]
        assert run.data.tags["searchlab.trial"] == str(row["number"])
        assert run.data.tags["searchlab.state"] == row["state"]
        assert run.data.params["units"] == str(row["params.units"])
        # MLflow shows a sampled float with 6 significant digits; the table has Optuna's value
        logged = float(run.data.params["learning_rate"])
        assert logged == pytest.approx(row["params.learning_rate"], rel=5e-6)
        assert run.data.metrics["epochs_run"] == row["epochs"]
        if row["state"] == "complete":
            assert run.data.metrics["objective"] == pytest.approx(row["value"])
            assert run.info.status == "FINISHED"
        else:  # the table ranks only complete trials by value
            assert pd.isna(row["value"])
            assert run.info.status == {"pruned": "KILLED", "failed": "FAILED"}[row["state"]]
    assert sorted(frame.columns[6:]) == ["params.learning_rate", "params.units"]


@pytest.mark.slow
def test_best_names_the_run_and_the_model(env: Finished, tmp_path: Path) -> None:
    best = searchlab.best(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    frame = searchlab.results(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    top = frame.iloc[0]
    assert (best.number, best.run_id) == (top["number"], top["run_id"])
    assert best.value == pytest.approx(top["value"])
    truth = _ostudy(env).best_trial  # what Optuna says, not only what our table says
    assert (best.number, best.params) == (truth.number, truth.params)
    assert best.value == pytest.approx(truth.value)
    assert best.run_id == truth.user_attrs["mlflow_run_id"]
    import mlflow.artifacts
    import mlflow.keras

    assert best.tracking_uri == env.tracking_uri
    assert best.model_uri.startswith("models:/m-")  # the session's MLflow Model
    mlflow.set_tracking_uri(best.tracking_uri)
    loaded = mlflow.keras.load_model(best.model_uri, dst_path=str(tmp_path))
    assert loaded.get_layer("hidden_0").units == best.params["units"]
    weights = mlflow.artifacts.download_artifacts(
        best.weights_uri, dst_path=str(tmp_path / "w"), tracking_uri=env.tracking_uri
    )
    assert Path(weights).stat().st_size > 0


@pytest.mark.slow
def test_cache_tags_become_columns_when_trials_have_them(env: Finished) -> None:
    before = searchlab.results(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    assert not [c for c in before.columns if c.startswith("cache")]
    run_id = before.loc[0, "run_id"]
    _client(env).set_tag(run_id, "searchlab.cache", "hit")  # as the feature cache tags a trial
    after = searchlab.results(env.study_file, storage=env.storage, tracking_uri=env.tracking_uri)
    assert after.loc[after["run_id"] == run_id, "cache"].tolist() == ["hit"]
    assert after.loc[after["run_id"] != run_id, "cache"].isna().all()
    _client(env).delete_tag(run_id, "searchlab.cache")


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.slow
def test_a_study_never_run_is_reported_in_one_line(env: Finished, tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text(STUDY.replace('name="report-test"', 'name="never-run"'))
    for command in (
        ["report", other, *env.stores()],
        ["ui", other, "--tracking-uri", env.tracking_uri, "--port", "0"],
    ):
        line = _one_line_error(invoke(*command))
        assert "never-run" in line and "never run" in line


def test_missing_stores_are_reported_in_one_line_and_not_created(project: Path) -> None:
    study_file = project / "s.py"
    study_file.write_text(STUDY)
    missing = project / "nowhere"
    optuna_db, mlflow_db = missing / "optuna.db", missing / "mlflow.db"
    cases = [
        ["report", study_file],  # the default stores of a fresh project
        [
            "report",
            study_file,
            "--storage",
            f"sqlite:///{optuna_db}",
            "--tracking-uri",
            f"sqlite:///{mlflow_db}",
        ],
        ["ui", study_file, "--tracking-uri", f"sqlite:///{mlflow_db}"],
        ["ui", "--tracking-uri", f"sqlite:///{mlflow_db}"],
    ]
    for command in cases:
        line = _one_line_error(invoke(*command))
        assert "No MLflow tracking store" in line or "No Optuna storage" in line, line
    assert not missing.exists() and not (project / ".searchlab").exists()
    with pytest.raises(searchlab.StoreError, match="No MLflow tracking store"):
        searchlab.results(study_file)


# --------------------------------------------------------------------------- browser test


def _browser() -> tuple[str, str]:
    """Paths of Chromium and its driver; skip (or fail in CI) when they are missing."""
    chromium = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = shutil.which("chromedriver")
    missing = []
    if chromium is None or driver is None:
        missing.append("chromium and chromedriver (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install 'searchlab[dev]')")
    if missing:
        reason = f"browser test needs {' and '.join(missing)}"
        if os.environ.get("SEARCHLAB_REQUIRE_BROWSER"):
            pytest.fail(reason + " (SEARCHLAB_REQUIRE_BROWSER is set)")
        pytest.skip(reason)
    assert chromium is not None and driver is not None
    return chromium, driver


class UiProcess:
    """``searchlab ui`` in a child process; collects its output; stops it on ``stop()``."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line starting {prefix!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.process.returncode


def _rows(browser, by) -> list[tuple[str, str]]:
    """The runs table as shown: (run name, objective cell) per row, top to bottom."""
    names, objectives = {}, {}
    for row in browser.find_elements(by.CSS_SELECTOR, ".ag-row[row-index]"):
        index = int(row.get_attribute("row-index"))
        link = row.find_elements(by.CSS_SELECTOR, '[col-id="run_name"] a, a[href*="/runs/"]')
        if link and index not in names:
            names[index] = link[0].text
        cell = row.find_elements(by.CSS_SELECTOR, '[col-id="metrics.`objective`"]')
        if cell:
            objectives[index] = cell[0].text
    return [
        (names.get(i, "?"), objectives.get(i, "")) for i in sorted(set(names) | set(objectives))
    ]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_ui_shows_the_trials_and_their_objective_in_a_real_browser(env: Finished) -> None:
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    trial_runs = [r for r in _runs(env) if r.data.tags.get("searchlab.role") != "session"]
    names = sorted(r.info.run_name for r in trial_runs)
    objectives = [
        repr(r.data.metrics["objective"]) for r in trial_runs if "objective" in r.data.metrics
    ]
    assert len(names) == len(_expected_order(env))
    assert len(objectives) == list(_states(env).values()).count("complete")

    ui = UiProcess(
        [
            sys.executable,
            "-m",
            "searchlab.cli",
            "ui",
            str(env.study_file),
            "--tracking-uri",
            env.tracking_uri,
            "--port",
            "0",
        ],
        env.env(),
    )
    browser = None
    try:
        line = ui.wait_for("MLflow UI: ", timeout=180)
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:") and "experiment 'report-test'" in line
        port = int(url.split(":")[2].split("/")[0])

        # with the server up, a remote --tracking-uri prints the page instead of starting one
        remote = invoke("ui", env.study_file, "--tracking-uri", f"http://127.0.0.1:{port}")
        assert remote.exit_code == 0, remote.output
        assert remote.output.startswith(f"MLflow server: http://127.0.0.1:{port}/#/experiments/")

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--window-size=2200,1100",
        ):
            options.add_argument(flag)
        profile = tempfile.mkdtemp(prefix="searchlab-chromium-")
        options.add_argument(f"--user-data-dir={profile}")
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.get(url)

        def body() -> str:
            return browser.find_element(By.TAG_NAME, "body").text

        wait = WebDriverWait(browser, 120, poll_frequency=0.5)
        # one parent per session, each with its own name: "report-test session N (date)"
        wait.until(lambda _: all(f"report-test session {n} (" in body() for n in (1, 2)))
        sessions = [r for r in _runs(env) if r.data.tags.get("searchlab.role") == "session"]
        assert len({r.info.run_name for r in sessions}) == 2, [r.info.run_name for r in sessions]
        assert all(r.info.run_name in body() for r in sessions)
        wait.until(lambda _: all(name in body() for name in names))
        columns = {
            e.get_attribute("col-id") for e in browser.find_elements(By.CSS_SELECTOR, "[col-id]")
        }
        wanted = {"metrics.`objective`", "params.`units`", "params.`learning_rate`"}
        assert wanted <= columns, columns
        cells = browser.find_elements(By.CSS_SELECTOR, '.ag-cell[col-id="metrics.`objective`"]')
        shown = {cell.text for cell in cells}
        missing = [value for value in objectives if value not in shown]
        assert not missing, f"objective values not in the objective column: {missing} ({shown})"

        # the view sorts runs by the objective, best first: a leaderboard of the trials, the
        # failed ones (no objective) and the sessions after them
        table = _rows(browser, By)
        values = [float(v) for _, v in table if v not in ("", "-")]
        assert values == sorted(values, reverse=True) and len(values) == len(objectives), table
        assert all(v in ("", "-") for _, v in table[len(values) :]), table
        best = _ostudy(env).best_trial
        # named as the console names it ("trial 3 of 4 (#2)" -> "trial 3 (#2)")
        assert re.fullmatch(rf"trial \d+ \(#{best.number}\)", table[0][0]), table
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "mlflow-ui.png"))

        # the latest session's run page lists its best model, an MLflow Model
        session = [r for r in _runs(env) if r.data.tags.get("searchlab.role") == "session"][-1]
        model_id = session.data.tags["searchlab.model_uri"].removeprefix("models:/")
        experiment = session.info.experiment_id
        browser.get(url.split("#")[0] + f"#/experiments/{experiment}/runs/{session.info.run_id}")
        wait.until(lambda _: "Logged models" in body() and "best_model" in body())
        links = browser.find_elements(By.CSS_SELECTOR, f'a[href*="{model_id}"]')
        assert links, "no link to the logged model on the session's run page"
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", links[0])
        assert browser.save_screenshot(str(ARTIFACTS / "mlflow-session-run.png"))

        # the best model's own page says it is registered, and links its version
        version = _client(env).get_model_version_by_alias(REGISTERED, "champion").version
        browser.get(url.split("#")[0] + f"#/experiments/{experiment}/models/{model_id}")
        wait.until(lambda _: REGISTERED in body())
        versions = browser.find_elements(
            By.CSS_SELECTOR, f'a[href*="/models/{REGISTERED}/versions/{version}"]'
        )
        assert versions, f"no link to {REGISTERED} version {version} on the model's page"
        # and its params and metrics: the best trial's
        wait.until(lambda _: "learning_rate" in body() and "val_accuracy" in body())
        assert browser.save_screenshot(str(ARTIFACTS / "mlflow-logged-model.png"))
    finally:
        if browser is not None:
            browser.quit()
        code = ui.stop()
    assert code == 0, "\n".join(ui.lines)
    assert ui.lines[-1] == "stopped the MLflow UI."
    assert not _listening(port)
