"""MLflow tracking: the only module that imports mlflow.

``Tracker`` is what the runner, the workers and re-evaluation may ask of a tracker (its
docstring gives the call order); ``MlflowTracker`` implements it on an MLflow tracking store,
``MemoryTracker`` in memory (for tests).  No MLflow object leaves this module: runs are read
back as ``RunRecord``s.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from searchlab.errors import StoreError, hide_password
from searchlab.outcome import TrialState

if TYPE_CHECKING:
    from searchlab.outcome import TrialResult

log = logging.getLogger(__name__)

#: how a trial ended -> its MLflow run's status
RUN_STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAILED: "FAILED",
}
#: experiment tag that makes the MLflow UI open the runs table, not its GenAI views
EXPERIMENT_KIND = "mlflow.experimentKind"
ML_EXPERIMENT = "custom_model_development"
#: experiment tag prefix of a view the MLflow UI opens with ``?viewStateShareKey=<key>``
SHARED_VIEW = "mlflow.sharedViewState."
COMPARE_VIEW_KEY = "searchlab"
MAX_PARAM = 6000
#: the folder of empty SQLite stores that new ones are copied from (``store_template_dir``)
STORE_TEMPLATES_ENV = "SEARCHLAB_STORE_TEMPLATES"
MAX_TAG = 8000
#: the metric logged at every epoch (its steps say which epochs a trial run has)
EPOCH_METRIC = "epoch_s"
#: on a trial run ended KILLED to go on later from its checkpoint: why, and after which epoch
PAUSED_TAG = "searchlab.paused"
#: MLflow's own variable, which ``mlflow.set_tracking_uri`` sets (``_fluent_uri``)
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: where MLflow's fluent API registers models, when set (else the tracking URI)
REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"
#: the name of the study's best model, an MLflow Model (``mlflow.keras`` flavor) logged on
#: the session's parent run; tag ``searchlab.model_uri`` on that run holds its ``models:/`` URI
MODEL_NAME = "best_model"
MODEL_URI_TAG = "searchlab.model_uri"
#: the registered model's alias that follows the best version (``searchlab run --register``)
CHAMPION = "champion"


@dataclass(frozen=True)
class RunRecord:
    """One run as the tracker holds it (a session run or a trial's)."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, KILLED or FAILED
    start_time: float  # seconds since the epoch
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: the run's dataset inputs: ``{"name", "context", "digest"}`` each
    inputs: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class ModelScore:
    """How a logged model scored: the study's objective, its direction and the value."""

    objective: str
    direction: str  # maximize or minimize
    value: float


@dataclass(frozen=True)
class Registration:
    """What ``Tracker.register_model`` did: the new version of registered model ``name``,
    whether the ``champion`` alias now points at it, and the version it pointed at before
    (with that version's score, when it had one)."""

    name: str
    version: str
    champion: bool
    previous_version: str | None = None
    previous_value: float | None = None
    reason: str = ""  # why the alias moved or stayed, in words


def champion_move(
    score: ModelScore, trial_run: str | None, champion: Mapping[str, str] | None
) -> tuple[str, str]:
    """What ``register_model`` does, given the tags of the version the ``champion`` alias
    points to (None: no alias yet), and why, in words:

    - ``same``: that version holds this trial's model already; nothing is registered.
    - ``move``: a new version, which takes the alias: there was none, or this one is better
      on the same objective in the study's direction (a tie keeps the older one).
    - ``keep``: a new version; the alias stays where it is (not better, or the champion was
      scored on another objective or by someone else: moving it is then the user's call).
    """
    if champion is None:
        return "move", "no champion yet"
    if trial_run and champion.get(TRIAL_RUN_TAG) == trial_run:
        return "same", "the champion holds this trial's model already"
    old = score_of(champion)
    if old is None:
        return "keep", "the champion has no searchlab score; move the alias by hand if you want"
    if (old.objective, old.direction) != (score.objective, score.direction):
        return "keep", (
            f"the champion was scored on {old.objective} ({old.direction}), this model on "
            f"{score.objective} ({score.direction}); move the alias by hand if you want"
        )
    better = score.value > old.value if score.direction == "maximize" else score.value < old.value
    verb = "beats" if better else "does not beat"
    return ("move" if better else "keep"), (
        f"{score.objective}={score.value:.4f} {verb} the champion's {old.value:.4f}"
    )


class Tracker(Protocol):
    """Where a session's results go: one parent run per session, one child run per trial.

    Call order, for one process:

    1. ``connect()``, before any training: an unreachable store fails here.
    2. ``start_session(name, info)`` once (the process that opens the session) or
       ``attach(session_id)`` (a worker, whose launcher opened it; ``own=True``: the worker
       that will close it, the last one of a shared session).  The first may be
       followed by ``reconcile(...)``, closing what a crashed process left open, and any
       time later by ``tag_session(tags)`` (links, heartbeat).
    3. Per trial: ``start_trial(number, params, tags)`` returns the trial's run id;
       ``log_inputs(run_id, inputs)`` records the data it trains on;
       ``log_epoch(run_id, epoch, metrics)`` once per epoch (``epoch`` from 1: the step); ``end_trial(run_id, result)``
       exactly once, which logs the outcome and the weights and closes the run; when Optuna
       could not record that outcome (its store failed: a full disk), ``fail_trial(run_id,
       error)`` ends the run FAILED instead, also one ``end_trial`` had closed.  A trial
       interrupted with a checkpoint ends with ``pause_trial(run_id, note)`` instead (the run
       ends KILLED, its Optuna trial stays RUNNING); a later process that takes the trial over
       calls ``resume_trial(run_id, tags)`` in place of ``start_trial``: the same run, open
       again, and the last epoch it logged (its steps go on from there).
    4. The session's owner: ``log_artifact(path)`` (trials table), ``log_model(model, ...)``
       (the best model, an MLflow Model on the parent run) and, when asked to, then
       ``register_model(uri, name, score)``; then ``end_session(summary, status)`` once,
       which closes the parent run and any trial run still open.  A worker ends with
       ``close_all("FAILED")``: it closes only its own runs; a process of a shared session
       (``--session``) that is not its last ends with ``leave()``, which does the same and
       leaves the parent run open even if it started it.  ``run_status(run_id)`` reads any
       run's status (None: no such run).

    Every run that was opened is closed, also when the session ends by an exception.  Every
    run carries the tags MLflow's ``start_run`` would set (``context_tags``: user, source,
    git commit) for the study file the tracker was made for (``source``).
    """

    uri: str

    @property
    def session_id(self) -> str | None: ...
    def connect(self) -> None: ...
    def start_session(self, name: str, info: Mapping[str, Any]) -> str: ...
    def attach(self, session_id: str, own: bool = False) -> None: ...
    def leave(self) -> None: ...
    def run_status(self, run_id: str) -> str | None: ...
    def tag_session(self, tags: Mapping[str, str]) -> None: ...
    def previous_session(self, name: str) -> str | None: ...
    def reconcile(
        self,
        name: str,
        trials: Mapping[int, Mapping[str, Any]],
        *,
        session_dead: Callable[[RunRecord], bool],
    ) -> list[str]: ...
    def start_trial(
        self,
        number: int,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
    ) -> str: ...
    def log_inputs(self, run_id: str, inputs: Sequence[DataInput]) -> None: ...
    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None: ...
    def end_trial(self, run_id: str, result: TrialResult) -> None: ...
    def fail_trial(self, run_id: str, error: str) -> None: ...
    def pause_trial(self, run_id: str, note: str) -> None: ...
    def resume_trial(self, run_id: str, tags: Mapping[str, str]) -> int: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_model(
        self,
        model: Any,
        sample: Any,
        *,
        requirements: Sequence[str],
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        trial_run: str | None = None,
    ) -> str: ...
    def register_model(
        self, model_uri: str, name: str, score: ModelScore, tags: Mapping[str, str] | None = None
    ) -> Registration: ...
    def download(self, run_id: str, path: str, dst: Path | None = None) -> Path: ...
    def end_session(self, summary: Mapping[str, Any], status: str = "FINISHED") -> None: ...
    def close_all(self, status: str = "FAILED") -> None: ...


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints each closed run's page, with the tracking URI's password in it: the CLI
    # says where the results are itself
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    no_proxy_for_loopback(os.environ)  # MLflow's requests to a local server: direct
    import mlflow  # noqa: F401 - configures its loggers on import; quiet them after

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when the tracking store's server does not answer: an
    http(s) MLflow server (its ``/health``, with the URI's user and password as basic
    auth), or a database server (connect and disconnect; MLflow itself would retry for
    about two minutes).  The password is never shown."""
    from searchlab.store import check_db_server, is_db_server, redact

    if is_db_server(uri):
        check_db_server(uri, "the MLflow tracking store", "--tracking-uri")
        return
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https"):
        return
    host = parsed.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit(parsed._replace(netloc=host)).rstrip("/") + "/health"
    request = urllib.request.Request(url)
    if parsed.username is not None:
        import base64

        pair = (
            f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        )
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with opener_for(url).open(request, timeout=timeout) as resp:  # user's server
            if resp.status >= 500:
                raise StoreError(f"MLflow server {redact(uri)} answered {resp.status} on /health.")
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(
            f"Cannot reach the MLflow tracking server {redact(uri)} "
            f"({exc.__class__.__name__}: {exc}). Start it (mlflow server --host ...) or pass "
            "another --tracking-uri."
        ) from None


def client(uri: str, *, create: bool = True) -> Any:
    """An ``MlflowClient`` on ``uri``; for a SQLite store its folder is created.  For
    ``MlflowTracker`` and ``doctor``, and for tests and scripts that read MLflow directly.
    With ``create=False`` (reading results) a local store that does not exist is one
    ``StoreError`` and nothing is created."""
    _quiet_mlflow()
    if not create:
        check_exists(uri)
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    try:
        if uri.startswith("sqlite:///") and create:
            path = Path(uri[len("sqlite:///") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _copy_empty_store(path)
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
    except Exception as exc:
        from searchlab.store import redact

        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreError(
            f"Cannot open the MLflow tracking store {redact(uri)} ({exc.__class__.__name__}: "
            f"{hide_password(first, uri)}). Check --tracking-uri."
        ) from None
    return c


def store_template_dir() -> Path:
    """Where empty SQLite tracking stores, one per MLflow version, are kept for copying:
    ``$SEARCHLAB_STORE_TEMPLATES``, else ``$XDG_CACHE_HOME/searchlab`` (``~/.cache``)."""
    configured = os.environ.get(STORE_TEMPLATES_ENV)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(cache) / "searchlab"


def _copy_empty_store(path: Path) -> None:
    """Create the SQLite tracking store ``path`` as a copy of an empty one.

    MLflow creates a new SQLite store by running every one of its schema migrations (67 in
    MLflow 3.17, ~1 s on a 2-core CPU, paid by each new project and by every test that
    tracks).  The
    first new store of each MLflow version is migrated the usual way (MLflow's own
    ``_initialize_tables``) in the template folder; later ones copy that file.  MLflow then
    opens the copy as its own: it checks the schema version and adds its Default experiment
    (with this store's artifact root), which the template leaves out.  Anything unusual (no
    writable template folder, another MLflow layout) leaves the store to MLflow, as before.
    """
    import shutil

    try:
        template = _empty_store_template()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        try:
            os.link(tmp, path)  # never over a store another process just created
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as exc:  # MLflow creates the store itself
        log.debug("no empty tracking store to copy (%s): MLflow migrates %s", exc, path)


def _empty_store_template() -> Path:
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    folder = store_template_dir()
    template = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{template.name}.{os.getpid()}.tmp"
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    os.replace(tmp, template)  # whole: a parallel process copies this one or its own
    return template


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def page_url(uri: str) -> str:
    """The address of an MLflow server's pages, for a browser: ``uri`` without a user and
    password (the browser asks for them), and without a trailing slash."""
    parsed = urllib.parse.urlsplit(uri)
    host = parsed.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parsed._replace(netloc=host)).rstrip("/")


def local_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI names (``sqlite:///f.db``, ``file:///d``, ``d``)."""
    parsed = urllib.parse.urlparse(uri)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
        return Path(uri)
    return None


def check_exists(uri: str) -> None:
    """For reading results: fail with one line, and create nothing, when the store is missing."""
    if is_remote(uri):
        check_reachable(uri)
        return
    path = local_path(uri)
    if path is not None and not path.exists():
        raise StoreError(
            f"No MLflow tracking store at {path}: nothing was tracked there. Run the study "
            "first (searchlab run STUDY_FILE), or pass the --tracking-uri it ran with."
        )


#: how ``mlflow ui`` is told its store: in its environment, not on its command line, where
#: every user of the machine reads it (``ps``) with the password it may hold
BACKEND_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"


def ui_command(
    uri: str, host: str, port: int, artifact_root: Path | None
) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow ui`` command line that serves the tracking store ``uri``, and the
    environment to start it in (the store's URI is there: ``BACKEND_STORE_ENV``)."""
    import sys

    env = {**os.environ, BACKEND_STORE_ENV: uri}
    no_proxy_for_loopback(env)  # what it may ask of itself or a local store: never proxied
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifact_root is not None:
        argv += ["--default-artifact-root", artifact_root.resolve().as_uri()]
    return argv, env


#: hosts that are this machine: a request to one never goes through a proxy
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    import ipaddress

    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def opener_for(url: str) -> urllib.request.OpenerDirector:
    """A urllib opener for ``url``: one that uses no proxy when ``url`` is on this machine
    (``http_proxy`` set without ``no_proxy=127.0.0.1`` would send a check of a local server
    to the proxy, which cannot reach it), else urllib's usual one (the environment's
    proxies)."""
    if is_loopback(urllib.parse.urlsplit(url).hostname):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def no_proxy_for_loopback(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` with this machine's names added to ``no_proxy`` and ``NO_PROXY`` (kept as
    they were otherwise), so that an HTTP client started in it -- MLflow's own, which
    reads them -- never sends a request to a local server through ``http_proxy``."""
    for key in ("no_proxy", "NO_PROXY"):
        listed = [h.strip() for h in env.get(key, "").split(",") if h.strip()]
        missing = [h for h in LOOPBACK if h not in listed]
        if missing:
            env[key] = ",".join([*listed, *missing])
    return env


def wait_for_ui(
    process: Any,
    url: str,
    timeout: float = 180.0,
    progress: Callable[[float], None] | None = None,
    every: float = 10.0,
) -> None:
    """Wait until the MLflow server at ``url`` answers ``/health`` (never through a proxy:
    it is on this machine); one line when it cannot.  ``progress(seconds)`` is called every
    ``every`` seconds while it does not answer yet (a loaded machine takes 30-60 s)."""
    started = time.monotonic()
    deadline, said = started + timeout, started
    opener = opener_for(url)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StoreError(
                f"The MLflow UI exited with code {process.returncode} before it answered on "
                f"{url}; run with -v to see its output, or try another --port."
            )
        try:
            with opener.open(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
        now = time.monotonic()
        if progress is not None and now - said >= every:
            said = now
            progress(now - started)
    raise StoreError(
        f"The MLflow UI did not answer on {url} within {timeout:.0f}s: the machine may be "
        "busy; run again, or with -v to see its output."
    )


@functools.lru_cache(maxsize=8)
def context_tags(source: str | None = None) -> dict[str, str]:
    """The tags MLflow's own ``mlflow.start_run`` puts on a run, resolved by MLflow's own
    run-context providers (``mlflow.tracking.context.registry.resolve_tags``): the user,
    the source's name and type, and its git commit, branch and repository (where there is
    one), plus whatever other context MLflow detects (a Databricks job, ...).

    ``source`` (the study file) is what ran: it replaces the program MLflow would name
    (``searchlab``'s own entry point), and its git checkout, not the program's, gives the git
    tags, through MLflow's own ``git_utils`` as its git context does for the program.
    Resolved once per process and source.
    """
    _quiet_mlflow()
    from mlflow.tracking.context import registry
    from mlflow.utils import git_utils, mlflow_tags

    tags = {k: str(v) for k, v in registry.resolve_tags().items()}
    if source:
        path = str(Path(source).resolve())
        tags[mlflow_tags.MLFLOW_SOURCE_NAME] = path
        for key, read in (
            (mlflow_tags.MLFLOW_GIT_COMMIT, git_utils.get_git_commit),
            (mlflow_tags.MLFLOW_GIT_BRANCH, git_utils.get_git_branch),
            (mlflow_tags.MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url),
        ):
            value = read(path)
            if value:
                tags[key] = str(value)
            else:  # the program's checkout says nothing about the study file
                tags.pop(key, None)
    return tags


@dataclass(frozen=True)
class DataInput:
    """One split of the data a trial trained on, for ``Tracker.log_inputs``: logged as an
    MLflow dataset input (``mlflow.data.from_numpy``) with ``context`` (``train`` or
    ``validation``) as its input tag.  ``digest`` identifies the arrays (MLflow keeps one
    dataset per name and digest in an experiment); ``source`` is where they came from (a
    file, or ``""`` for a loader: MLflow then records the code that ran)."""

    name: str
    context: str
    digest: str
    features: Any  # a NumPy array
    targets: Any
    source: str = ""


def session_tags(name: str, info: Mapping[str, Any]) -> dict[str, str]:
    """The tags of a session's parent run: its study, its role, and ``info`` (but the space
    and the run params, which are params) as ``searchlab.*``."""
    return {
        "searchlab.study": name,
        "searchlab.role": "session",
        **{
            f"searchlab.{k}": _short(v, MAX_TAG)
            for k, v in info.items()
            if k not in ("space", "run_params")
        },
    }


def trial_tags(session_id: str, number: int, tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a trial's run starts with: its parent session, its number, RUNNING."""
    return {
        "mlflow.parentRunId": session_id,
        "searchlab.trial": str(number),
        "searchlab.state": "running",
        **tags,
    }


def _short(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: metrics that are durations in seconds
SECONDS_METRICS = ("epoch_s", "duration_s", "fit_s", "session_seconds")


def shown(key: str, value: float) -> float:
    """A metric as searchlab writes it to MLflow, to be read: durations to the millisecond;
    anything else -- Keras's float32 losses and accuracies, the objective, a learning rate --
    with float32's 7 significant digits, which drops only the noise of widening float32 to
    float64 (the UI shows ``0.88``, not ``0.8799999952316284``).  Optuna keeps the values
    unrounded."""
    value = float(value)
    if not math.isfinite(value):
        return value
    if key in SECONDS_METRICS:
        return round(value, 3)
    return float(f"{value:.7g}")


def params_text(params: Mapping[str, Any]) -> str:
    """A trial's params on one line for its ``searchlab.params`` tag: floats to 4
    significant digits (the params themselves are logged exactly)."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def session_run_name(name: str, number: int, started: float) -> str:
    """A session's parent run name, which tells the study's sessions apart in the MLflow UI:
    ``cifar-vgg16 session 3 (2026-12-08 01:40)`` -- the study, the session's number in its
    experiment (from 1), and when it started (this machine's local time)."""
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
    return f"{name} session {number} ({stamp})"


def trial_run_name(number: int, index: int | None = None) -> str:
    """A trial run's name, in the console's words: ``trial 3 (#2)`` is the run of the line
    ``trial 3 of 20 (#2): ...`` (``index``: the trial's place in the study, from 1; ``#``:
    its Optuna number, which never changes); ``trial #2`` without an index."""
    return f"trial {index} (#{number})" if index is not None else f"trial #{number}"


#: significant digits a float param keeps when nobody wrote it (sampled from a range)
SAMPLED_DIGITS = 6


def param_text(value: Any) -> str:
    """A param as logged to MLflow: the digits the user would write, not 17.

    - ints, strings, bools and floats whose shortest ``repr`` has at most 12 significant
      digits (what a user writes in ``Choice``/``grid=``/``Fixed``, a grid step's points):
      ``repr``, which reads back as exactly the value the trial used;
    - a float that is such a value plus arithmetic noise (``0.1 + 0.2``, a step grid or
      Optuna's ``step`` points, ``10 ** -3``: within 1e-13 of its 12-digit rounding): that
      rounding (``0.3``, not ``0.30000000000000004``);
    - any other float, one sampled from a continuous range (``Float(1e-4, 1e-2, log=True)``):
      ``SAMPLED_DIGITS`` significant digits (``0.00123457``); the exact value stays in the
      Optuna study, which export and re-evaluation read.
    """
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value) or value == 0.0:
        return repr(value)
    text = repr(value)
    digits = text.lower().split("e")[0].lstrip("-").replace(".", "").strip("0")
    if len(digits) <= 12:
        return text
    short = f"{value:.12g}"
    if abs(float(short) - value) <= 1e-13 * abs(value):
        return repr(float(short))
    return f"{value:.{SAMPLED_DIGITS}g}"


def score_tags(score: ModelScore) -> dict[str, str]:
    """A registered version's score, as its tags (what ``champion_move`` compares next time)."""
    return {
        "searchlab.objective": score.objective,
        "searchlab.direction": score.direction,
        "searchlab.value": repr(float(score.value)),
    }


def score_of(tags: Mapping[str, str]) -> ModelScore | None:
    """The score ``score_tags`` wrote, or None (a version registered by someone else)."""
    try:
        return ModelScore(
            tags["searchlab.objective"], tags["searchlab.direction"], float(tags["searchlab.value"])
        )
    except (KeyError, ValueError):
        return None


#: a version's tag naming the trial run whose weights it holds: the same trial is not
#: registered twice (a resumed study whose best did not change)
TRIAL_RUN_TAG = "searchlab.trial_run"


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block (``Model.log``
    finalizes a logged model, the registry resolves ``models:/<id>`` and
    ``mlflow.keras.load_model`` reads models through it, where the client has its own),
    then put back what it resolved to before.  ``mlflow.set_tracking_uri`` also exports
    ``MLFLOW_TRACKING_URI`` to the environment, which searchlab reads as the default
    ``--tracking-uri``: that variable is restored exactly (unset if it was), as is
    ``MLFLOW_REGISTRY_URI``, which points ``mlflow.register_model`` at the same store."""
    import mlflow

    before = mlflow.get_tracking_uri()
    env = {key: os.environ.get(key) for key in (TRACKING_URI_ENV, REGISTRY_URI_ENV)}
    mlflow.set_tracking_uri(uri)
    os.environ[REGISTRY_URI_ENV] = uri  # the registry is the tracking store's, as for the client
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def user_mlflow(tracker: Any) -> Iterator[None]:
    """While a search runs in this process, keep the user's own MLflow calls in the study.

    The tracking URI is set before any user code runs, so nothing creates ``./mlruns`` or
    ``./mlflow.db``: the study's store while a trial runs, else a throwaway one (the runs
    a builder starts while searchlab reads its space, in the checks before the search or
    before each trial, are not the study's, and go with that store); while a trial runs
    its run is MLflow's active run, so ``mlflow.log_*`` in the user's code lands on it and
    ``mlflow.start_run()`` starts a run nested under it (as with ``nested=True``); and
    autologging is off (a user's ``mlflow.keras.autolog()`` would log every epoch again, at
    other steps, and the model as well), said once.  A tracker other than ``MlflowTracker``
    changes nothing."""
    if not isinstance(tracker, MlflowTracker):
        yield
        return
    import mlflow

    real_start_run = mlflow.start_run

    @functools.wraps(real_start_run)
    def start_run(*args: Any, **kwargs: Any) -> Any:
        active = mlflow.active_run()
        if active is not None and active.info.run_id in tracker._active:
            kwargs["nested"] = True  # under the trial's run, not "already active"
            kwargs.setdefault("experiment_id", tracker.experiment_id)  # in the study's
        return real_start_run(*args, **kwargs)

    import shutil

    # outside trials (the checks before the search, reading a trial's params, rebuilding
    # the best model) the user's runs go to a store of their own, removed afterwards
    checks = Path(tempfile.mkdtemp(prefix="searchlab-checks-"))
    _copy_empty_store(checks / "mlflow.db")
    elsewhere = f"sqlite:///{checks / 'mlflow.db'}"
    with _fluent_uri(elsewhere), _autologging_off():
        mlflow.start_run = start_run
        tracker._contain = elsewhere
        try:
            yield
        finally:
            tracker._contain = None
            mlflow.start_run = real_start_run
            shutil.rmtree(checks, ignore_errors=True)


@contextmanager
def _autologging_off() -> Iterator[None]:
    """MLflow's autologging does nothing in the block, whatever the user's code enables:
    MLflow's own ``disable_autologging`` (not in its documented API: a test checks that a
    user's ``mlflow.keras.autolog()`` logs nothing in a trial).  Says so once if the code
    turned any on."""
    from mlflow.utils import autologging_utils

    try:
        with autologging_utils.disable_autologging():
            yield
    finally:
        enabled = sorted(
            name
            for name, conf in autologging_utils.AUTOLOGGING_INTEGRATIONS.items()
            if isinstance(conf, dict) and conf.get("disable") is False
        )
        if enabled:
            log.warning(
                "the study's code turns on MLflow autologging (%s): it is off in searchlab's "
                "trials, whose runs have each epoch's metrics, the params and the best model",
                ", ".join(enabled),
            )


class MlflowTracker:
    """Logs a study to MLflow: one experiment per study, one parent run per session.

    Args:
        uri: the tracking URI (``sqlite:///...``, ``http://host:5000``, a folder, ...).
        artifact_root: where a new experiment keeps artifacts when the store is local.
        source: the study file the runs come from (their ``mlflow.source.*`` tags).
        create: False for a reader (``export``, ``report``, ``ui``): a local store that
            does not exist is a ``StoreError``, never created.
    """

    def __init__(
        self,
        uri: str,
        artifact_root: Path | None = None,
        source: str | Path | None = None,
        *,
        create: bool = True,
    ) -> None:
        self.uri = uri
        self.artifact_root = artifact_root
        self.source = str(source) if source is not None else None
        self.create = create
        self._client: Any = None
        self.experiment_id: str | None = None
        self._session_id: str | None = None
        self._open: set[str] = set()
        #: inside ``user_mlflow``, the store the user's runs go to outside trials: a trial's
        #: run is MLflow's active run while it runs
        self._contain: str | None = None
        self._active: set[str] = set()

    @property
    def session_id(self) -> str | None:
        """The session's parent run id, once started or attached."""
        return self._session_id

    @property
    def _mlflow(self) -> Any:
        """The ``MlflowClient``, opened on first use (it never leaves this module), behind
        ``_Guarded``: what MLflow raises leaves as a ``StoreError``."""
        if self._client is None:
            self._client = _Guarded(client(self.uri, create=self.create), self.uri)
        return self._client

    def connect(self) -> None:
        """Open the store now, so an unreachable one fails before any training."""
        _ = self._mlflow

    def experiment(self, name: str, create: bool = True) -> str | None:
        exp = self._mlflow.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self._mlflow.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        if not create:
            return None
        location = None
        if self.artifact_root is not None and not self.uri.startswith(("http://", "https://")):
            self.artifact_root.mkdir(parents=True, exist_ok=True)
            location = self.artifact_root.resolve().as_uri()
        return self._mlflow.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND: ML_EXPERIMENT}
        )

    def start_session(self, name: str, info: Mapping[str, Any]) -> str:
        from mlflow.entities import Param

        self.experiment_id = self.experiment(name)
        tags = {**context_tags(self.source), **session_tags(name, info)}
        earlier = self._mlflow.search_runs(
            [self.experiment_id],
            filter_string="tags.`searchlab.role` = 'session'",
            max_results=50_000,
        )
        run_name = session_run_name(name, len(earlier) + 1, time.time())
        run = self._mlflow.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self._session_id = run.info.run_id
        self._open.add(self._session_id)
        params = [
            Param(f"space.{k}", _short(v, MAX_PARAM)) for k, v in info.get("space", {}).items()
        ]
        # session settings that are not searched (e.g. precision) are params of the parent run
        params += [Param(k, _short(v, MAX_PARAM)) for k, v in info.get("run_params", {}).items()]
        if params:
            self._mlflow.log_batch(self._session_id, params=params)
        return self._session_id

    def attach(self, session_id: str, own: bool = False) -> None:
        """Log this process's trials under another process's session run (a worker of
        ``searchlab run --workers N``); that process opens and closes the parent run, unless
        ``own``: then this one closes it (``end_session``), as the last process of a shared
        session does."""
        run = self._mlflow.get_run(session_id)
        self.experiment_id = run.info.experiment_id
        self._session_id = session_id
        if own:
            self._open.add(session_id)

    def leave(self) -> None:
        """Close this process's trial runs (FAILED) and leave the session run open, also when
        this process started it: a shared session's other processes go on with it."""
        if self._session_id is not None:
            self._open.discard(self._session_id)
        self.close_all("FAILED")

    def run_status(self, run_id: str) -> str | None:
        """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``; None when there is no such run.
        A store that cannot answer raises ``StoreError`` (one line), not None."""
        try:
            return str(self._mlflow.get_run(run_id).info.status)
        except MissingRun:
            return None

    def tag_session(self, tags: Mapping[str, str]) -> None:
        """Tags on the session's parent run (links to the study, liveness heartbeat)."""
        from mlflow.entities import RunTag

        if self._session_id is not None and tags:
            self._mlflow.log_batch(
                self._session_id, tags=[RunTag(k, _short(v, MAX_TAG)) for k, v in tags.items()]
            )

    def previous_session(self, name: str) -> str | None:
        """The run id of the study's latest session run before this one, if any."""
        exp_id = self.experiment(name, create=False)
        if exp_id is None:
            return None
        runs = self._mlflow.search_runs(
            [exp_id],
            filter_string="tags.`searchlab.role` = 'session'",
            max_results=2,
            order_by=["attributes.start_time DESC"],
        )
        return next((r.info.run_id for r in runs if r.info.run_id != self._session_id), None)

    def reconcile(
        self,
        name: str,
        trials: Mapping[int, Mapping[str, Any]],
        *,
        session_dead: Callable[[RunRecord], bool],
    ) -> list[str]:
        """Close the MLflow runs a crashed process left behind; return what was changed.

        ``trials`` maps an Optuna trial number to ``{"state", "value", "error", "run_id"}``
        (``state``: a ``TrialState``).  Rules, so MLflow agrees with Optuna after any crash:

        - a RUNNING trial run whose Optuna trial is failed (or missing: the process died
          before linking it) ends FAILED with the error; complete ends FINISHED with its
          objective; pruned ends KILLED.  A run whose trial still runs is left alone.
        - a FINISHED trial run whose Optuna trial is failed (killed after MLflow recorded it
          but before Optuna did) ends FAILED: the point is run again in a new trial.
        - a RUNNING session run for which ``session_dead(run)`` is true ends FAILED.
        """
        changed: list[str] = []
        by_run_id = {t["run_id"]: (n, t) for n, t in trials.items() if t.get("run_id")}
        for run in self._runs(name):
            info, tags = run.info, run.data.tags
            if info.run_id == self._session_id:
                continue
            if tags.get("searchlab.role") == "session":
                if info.status == "RUNNING" and session_dead(_record(run)):
                    self._mlflow.set_tag(info.run_id, "searchlab.end", "interrupted (process gone)")
                    self._mlflow.set_terminated(info.run_id, "FAILED")
                    changed.append(f"session {info.run_id}: FAILED")
                continue
            if "searchlab.trial" not in tags:
                continue
            linked = by_run_id.get(info.run_id)
            if linked is not None:
                number, trial = linked
            else:
                try:
                    number = int(tags["searchlab.trial"])
                except ValueError:
                    continue
                trial = trials.get(number) or {"state": TrialState.FAILED, "run_id": None}
                if trial.get("run_id") not in (None, info.run_id) and info.status != "RUNNING":
                    continue  # an older run with the same number (a recreated Optuna study)
            status = self._reconcile_trial(info, trial, linked is not None)
            if status:
                changed.append(f"trial {number} run {info.run_id}: {status}")
        for line in changed:
            log.warning("reconciled MLflow: %s", line)
        return changed

    def _reconcile_trial(self, info: Any, trial: Mapping[str, Any], linked: bool) -> str | None:
        """End one trial run as ``reconcile``'s rules say; return what changed, if anything."""
        from mlflow.entities import Metric, RunTag

        state: TrialState = trial["state"]
        if info.status == "RUNNING":
            if not state.finished and state is not TrialState.FAILED:  # running or waiting
                if trial.get("run_id") in (None, info.run_id):
                    return None
            status = RUN_STATUS.get(state, "FAILED")
            now = int(time.time() * 1000)
            ended = state if status != "FAILED" else TrialState.FAILED
            new_tags = [RunTag("searchlab.state", ended.value)]
            metrics = []
            if status == "FAILED":
                error = trial.get("error") or "interrupted: the process running it died"
                new_tags.append(RunTag("searchlab.error", _short(error, MAX_TAG)))
            elif trial.get("value") is not None:
                metrics.append(Metric("objective", shown("objective", trial["value"]), now, 0))
            self._mlflow.log_batch(info.run_id, metrics=metrics, tags=new_tags)
            self._mlflow.set_terminated(info.run_id, status)
            return status
        if info.status == "FINISHED" and state is TrialState.FAILED and linked:
            error = trial.get("error") or "interrupted before Optuna recorded the result"
            note = _short(f"{error} (Optuna never recorded this result)", MAX_TAG)
            self._mlflow.log_batch(
                info.run_id,
                tags=[RunTag("searchlab.state", "failed"), RunTag("searchlab.error", note)],
            )
            self._mlflow.set_terminated(info.run_id, "FAILED")
            return "FINISHED -> FAILED"
        return None

    def start_trial(
        self,
        number: int,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
    ) -> str:
        from mlflow.entities import Param, RunTag

        assert self.experiment_id is not None and self._session_id is not None
        all_tags = {**context_tags(self.source), **trial_tags(self._session_id, number, tags)}
        run = self._mlflow.create_run(
            self.experiment_id, tags=all_tags, run_name=run_name or trial_run_name(number)
        )
        run_id = run.info.run_id
        self._open.add(run_id)
        self._mlflow.log_batch(
            run_id,
            params=[Param(k, _short(param_text(v), MAX_PARAM)) for k, v in params.items()],
            tags=[RunTag("searchlab.params", _short(params_text(params), MAX_TAG))],
        )
        if self._contain:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            mlflow.start_run(run_id=run_id, nested=True)  # the user's code logs to it
            self._active.add(run_id)
        return run_id

    def log_inputs(self, run_id: str, inputs: Sequence[DataInput]) -> None:
        """Log each split as an MLflow dataset input of run ``run_id``: a NumPy dataset
        (``mlflow.data.from_numpy``: schema and shapes of features and targets) with the
        given name, digest and source, and the input tag ``mlflow.data.context``."""
        import warnings

        from mlflow.data.numpy_dataset import from_numpy  # mlflow.data.from_numpy
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entries = []
        for item in inputs:
            with warnings.catch_warnings():
                # a file path matches MLflow's local-file source twice; it says so, and
                # takes it as one
                warnings.simplefilter("ignore", UserWarning)
                dataset = from_numpy(
                    item.features,
                    targets=item.targets,
                    source=item.source or None,  # type: ignore[arg-type]  # None: the code
                    name=item.name,
                    digest=item.digest,
                )
            entries.append(
                DatasetInput(
                    Dataset(**dataset.to_dict()),
                    tags=[InputTag("mlflow.data.context", item.context)],
                )
            )
        self._mlflow.log_inputs(run_id, datasets=entries)

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._mlflow.log_batch(
            run_id,
            metrics=[Metric(k, shown(k, v), now, epoch) for k, v in metrics.items()],
            synchronous=True,
        )

    def end_trial(self, run_id: str, result: TrialResult) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [
            Metric("duration_s", shown("duration_s", result.duration), now, 0),
            Metric("fit_s", shown("fit_s", result.fit_seconds), now, 0),
            Metric("epochs_run", float(result.epochs_run), now, 0),
        ]
        if result.value is not None:
            metrics.append(Metric("objective", shown("objective", result.value), now, 0))
        if result.best_epoch is not None:
            metrics.append(Metric("best_epoch", float(result.best_epoch), now, 0))
        tags = [RunTag("searchlab.state", result.state.value)]
        tags += [RunTag(k, _short(v, MAX_TAG)) for k, v in result.tags.items()]
        if result.error:
            tags.append(RunTag("searchlab.error", _short(result.error, MAX_TAG)))
        try:
            self._mlflow.log_batch(run_id, metrics=metrics, tags=tags)
            if result.weights_path is not None and result.weights_path.exists():
                self._mlflow.log_artifact(run_id, str(result.weights_path), "weights")
        finally:
            self.close_run(run_id, RUN_STATUS[result.state])

    def fail_trial(self, run_id: str, error: str) -> None:
        """End trial run ``run_id`` FAILED with ``error``, also when ``end_trial`` closed it
        already: Optuna could not record the trial's result, so MLflow must not show one."""
        from mlflow.entities import RunTag

        self._open.discard(run_id)
        self._mlflow.log_batch(
            run_id,
            tags=[
                RunTag("searchlab.state", TrialState.FAILED.value),
                RunTag("searchlab.error", _short(error, MAX_TAG)),
            ],
        )
        self._mlflow.set_terminated(run_id, "FAILED")

    def pause_trial(self, run_id: str, note: str) -> None:
        """End trial run ``run_id`` KILLED, tagged ``searchlab.paused`` with ``note``: its
        trial goes on from its checkpoint in a later process (``resume_trial``)."""
        from mlflow.entities import RunTag

        try:
            self._mlflow.log_batch(run_id, tags=[RunTag(PAUSED_TAG, _short(note, MAX_TAG))])
        finally:
            self.close_run(run_id, "KILLED")

    def resume_trial(self, run_id: str, tags: Mapping[str, str]) -> int:
        """Open trial run ``run_id`` again (RUNNING; ``MissingRun`` when it is gone), add
        ``tags``, and return the last epoch it logged (0: none)."""
        from mlflow.entities import RunTag

        history = self._mlflow.get_metric_history(run_id, EPOCH_METRIC)
        last = max((int(m.step) for m in history), default=0)
        self._mlflow.update_run(run_id, status="RUNNING")
        self._open.add(run_id)
        self._mlflow.log_batch(
            run_id, tags=[RunTag(k, _short(v, MAX_TAG)) for k, v in tags.items()]
        )
        return last

    def close_run(self, run_id: str, status: str) -> None:
        if run_id in self._active:  # MLflow's active run: end it, and the user's under it
            import mlflow

            self._active.discard(run_id)
            while (active := mlflow.active_run()) is not None:
                mlflow.end_run(status)
                if active.info.run_id == run_id:
                    break
            if self._contain:
                mlflow.set_tracking_uri(self._contain)
        if run_id in self._open:
            self._open.discard(run_id)
            self._mlflow.set_terminated(run_id, status)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file on the session's parent run."""
        assert self._session_id is not None
        self._mlflow.log_artifact(self._session_id, str(path), artifact_path)

    def log_model(
        self,
        model: Any,
        example: tuple[Any, Any],
        *,
        requirements: Sequence[str],
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        trial_run: str | None = None,
    ) -> str:
        """Log ``model`` (a complete Keras model) on the session's parent run as an MLflow
        Model of the ``mlflow.keras`` flavor named ``best_model``: a LoggedModel of the
        study's experiment whose source run is the parent run, with ``tags``, a signature
        inferred from ``example`` (a few raw inputs, and the model's outputs on them), and
        ``requirements`` as its pip requirements (given, not inferred: MLflow would load the
        model again in a subprocess).  ``params`` (the trial's) become the model's params
        (``param_text``), and the last value of each metric of ``trial_run`` (the trial run
        whose weights it holds) is linked to it (``link_metrics``): the model's page in the
        UI shows what it was trained with and how it scored.  Returns its
        ``models:/<model_id>`` URI, which is also tagged on the parent run
        (``searchlab.model_uri``)."""
        import mlflow
        from mlflow.models import Model, infer_signature

        assert self._session_id is not None and self.experiment_id is not None
        signature = infer_signature(*example)
        # created here, in the study's experiment: Model.log alone would put it in the
        # experiment of MLflow's process-wide state
        logged = self._mlflow.create_logged_model(
            self.experiment_id,
            name=MODEL_NAME,
            source_run_id=self._session_id,
            tags={k: _short(v, MAX_TAG) for k, v in tags.items()},
            params={k: _short(param_text(v), MAX_PARAM) for k, v in (params or {}).items()},
        )
        with _fluent_uri(self.uri):
            info = Model.log(
                None,
                name=MODEL_NAME,
                flavor=mlflow.keras,
                model=model,
                run_id=self._session_id,
                signature=signature,
                pip_requirements=list(requirements),
                model_id=logged.model_id,
            )
        uri = str(info.model_uri)
        if trial_run is not None:
            self.link_metrics(trial_run, logged.model_id)
        self.tag_session({MODEL_URI_TAG: uri})
        return uri

    def link_metrics(self, run_id: str, model_id: str) -> None:
        """Link the last value of each metric of run ``run_id`` to LoggedModel ``model_id``:
        the same metric (value, step, time) logged again with ``model_id``, which MLflow
        keeps once on the run (a metric equal in all of them is the same point) and adds to
        the model's metrics."""
        from mlflow.entities import Metric

        linked = []
        for key in self._mlflow.get_run(run_id).data.metrics:
            history = self._mlflow.get_metric_history(run_id, key)
            if history:
                last = max(history, key=lambda m: (m.step, m.timestamp))
                linked.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
        if linked:
            self._mlflow.log_batch(run_id, metrics=linked)

    def register_model(
        self, model_uri: str, name: str, score: ModelScore, tags: Mapping[str, str] | None = None
    ) -> Registration:
        """Register ``model_uri`` as a new version of ``name`` (created if new) and move the
        ``champion`` alias to it when it beats the version the alias points to (see
        ``champion_move``).  ``tags`` go on the version (``searchlab.trial_run`` names the
        trial whose model it is)."""
        from mlflow.exceptions import MlflowException

        tags = dict(tags or {})
        try:
            with _fluent_uri(self.uri):  # the registry resolves models:/<id> through it
                return self._register(model_uri, name, score, tags)
        except MlflowException as exc:
            from searchlab.store import redact

            text = str(exc).strip()
            first = hide_password(text.splitlines()[0] if text else type(exc).__name__, self.uri)
            raise StoreError(
                f"Cannot register the best model as {name!r} in {redact(self.uri)} "
                f"({first}). Use a tracking store with a model registry "
                "(a database or an MLflow server), or drop --register."
            ) from None

    def _register(
        self, model_uri: str, name: str, score: ModelScore, tags: Mapping[str, str]
    ) -> Registration:
        from mlflow.exceptions import MlflowException

        # the raw client: its error codes tell an existing model or a missing alias apart
        # (``register_model`` turns what else it raises into one StoreError line)
        registry = self._mlflow._inner
        try:
            registry.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        try:
            champion = registry.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        old_tags = dict(champion.tags) if champion is not None else None
        move, reason = champion_move(score, tags.get(TRIAL_RUN_TAG), old_tags)
        if move == "same":
            assert champion is not None
            version = str(champion.version)
        else:
            version = self._new_version(model_uri, name, {**tags, **score_tags(score)})
        if move == "move":
            registry.set_registered_model_alias(name, CHAMPION, version)
        old = score_of(old_tags or {})
        return Registration(
            name=name,
            version=version,
            champion=move in ("move", "same"),
            previous_version=str(champion.version) if champion is not None else None,
            previous_value=old.value if old is not None else None,
            reason=reason,
        )

    def _new_version(self, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
        """A new version of registered model ``name`` from ``model_uri``, made by MLflow's
        ``mlflow.register_model`` (in a ``_fluent_uri`` block): for a ``models:/<id>`` URI it
        also records the version on the LoggedModel (its ``mlflow.modelVersions`` tag), which
        is how the UI's model page shows that the model is registered and links the version
        (``MlflowClient.create_model_version`` does that only behind an MLflow server).  What
        MLflow prints about it goes to the log: the CLI says what was registered."""
        import contextlib
        import io

        import mlflow

        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            version = mlflow.register_model(
                model_uri, name, await_registration_for=0, tags=dict(tags)
            )
        log.info("%s", said.getvalue().strip())
        return str(version.version)

    def load_keras_model(self, model_uri: str, dst: Path) -> Any:
        """The Keras model of an MLflow Model (``models:/NAME@champion``, ``models:/<id>``,
        ``runs:/...``), downloaded into ``dst`` (``searchlab export``)."""
        import mlflow

        with _fluent_uri(self.uri):
            return mlflow.keras.load_model(model_uri, dst_path=str(dst))

    def end_session(self, summary: Mapping[str, Any], status: str = "FINISHED") -> None:
        """Log the summary (numbers as metrics, the best params as ``best.*`` params) on the
        parent run, then close it and every trial run still open."""
        from mlflow.entities import Metric, Param

        if self._session_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, shown(k, v), now, 0)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
        ]
        params = [
            Param(f"best.{k}", _short(param_text(v), MAX_PARAM))
            for k, v in (summary.get("best_params") or {}).items()
        ]
        try:
            self._mlflow.log_batch(self._session_id, metrics=metrics, params=params)
        finally:
            self.close_all(status)

    def close_all(self, status: str = "FAILED") -> None:
        """Close every run this tracker opened (children first): none is left RUNNING."""
        parent = self._session_id
        for run_id in sorted(self._open, key=lambda r: r == parent):
            try:
                self.close_run(run_id, status if run_id == parent else "FAILED")
            except Exception as exc:  # closing is best effort once the store is gone
                log.warning("could not close MLflow run %s: %s", run_id, exc)

    def download(self, run_id: str, path: str, dst: Path | None = None) -> Path:
        dst = dst or Path(tempfile.mkdtemp(prefix="searchlab-"))
        return Path(self._mlflow.download_artifacts(run_id, path, str(dst)))

    def find_experiment(self, name: str) -> str | None:
        """The id of study ``name``'s experiment, or None; marks it as an ML experiment so the
        MLflow UI opens its runs table."""
        exp = self._mlflow.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            return None
        if exp.tags.get(EXPERIMENT_KIND) is None:
            self._mlflow.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, ML_EXPERIMENT)
        return exp.experiment_id

    def set_compare_view(
        self, experiment_id: str, params: list[str], direction: str = "maximize"
    ) -> str:
        """Store a runs-table view on the experiment: trial params, the objective, epochs and
        state as columns, runs sorted by the objective best first (descending to maximize,
        ascending to minimize; trials nested under their session, which has no objective and
        comes after the runs that have one).  Returns the share key that opens it
        (``#/experiments/<id>/runs?viewStateShareKey=<key>``)."""
        import json

        objective = "metrics.`objective`"
        columns = [
            objective,
            "metrics.`epochs_run`",
            "metrics.`best_value`",
            *(f"params.`{name}`" for name in params),
            "tags.`searchlab.state`",
        ]
        view = {
            "selectedColumns": columns,
            "orderByKey": objective,
            "orderByAsc": direction == "minimize",
        }
        self._mlflow.set_experiment_tag(
            experiment_id, SHARED_VIEW + COMPARE_VIEW_KEY, json.dumps(view)
        )
        return COMPARE_VIEW_KEY

    def log_run_files(self, run_id: str, files: list[Path], artifact_path: str) -> None:
        """Log ``files`` on run ``run_id`` under ``artifact_path`` (a finished run is fine)."""
        for path in files:
            self._mlflow.log_artifact(run_id, str(path), artifact_path)

    def runs(self, name: str) -> list[RunRecord]:
        """Every run of a study's experiment (parents and trials), oldest first."""
        return [_record(run) for run in self._runs(name)]

    def run_tags(self, run_id: str) -> dict[str, str]:
        """The tags of run ``run_id``."""
        return dict(self._mlflow.get_run(run_id).data.tags)

    def _runs(self, name: str) -> list[Any]:
        exp_id = self.experiment(name, create=False)
        if exp_id is None:
            return []
        return list(
            self._mlflow.search_runs(
                [exp_id], max_results=50_000, order_by=["attributes.start_time ASC"]
            )
        )


class MissingRun(StoreError, LookupError):
    """The tracking store has no such run (or experiment): another store, or deleted."""


class _Guarded:
    """An ``MlflowClient`` whose methods raise ``StoreError`` (one line, no password) for
    what MLflow raises: no MLflow exception leaves this module, so the CLI says it in one
    line (the store went away, refused a write, holds an experiment it cannot serve)."""

    def __init__(self, inner: Any, uri: str) -> None:
        self._inner = inner
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        from mlflow.exceptions import MlflowException

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except MlflowException as exc:
                from searchlab.store import redact

                text = str(exc.message if hasattr(exc, "message") else exc).strip()
                first = hide_password(
                    text.splitlines()[0] if text else type(exc).__name__, self._uri
                )
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    raise MissingRun(f"{first} (in {redact(self._uri)})") from None
                raise StoreError(
                    f"The MLflow tracking store {redact(self._uri)} refused {name}: {first} "
                    "Check --tracking-uri; finished trials are kept."
                ) from None

        return call


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=run.info.start_time / 1000,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        inputs=tuple(
            {
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "context": next((t.value for t in d.tags if t.key == "mlflow.data.context"), ""),
            }
            for d in (run.inputs.dataset_inputs if run.inputs else [])
        ),
    )


class MemoryTracker:
    """A ``Tracker`` that keeps everything in memory: for tests of the runner and engines,
    and the reference the tracker contract suite holds ``MlflowTracker`` to."""

    def __init__(self, uri: str = "memory://", source: str | Path | None = None) -> None:
        self.uri = uri
        self.source = str(source) if source is not None else None
        self.records: dict[str, dict[str, Any]] = {}  # run id -> run
        self.events: list[tuple[str, ...]] = []  # (method, run id, ...) in call order
        self.artifacts: dict[str, list[str]] = {}  # run id -> artifact paths
        self.models: dict[str, dict[str, Any]] = {}  # model uri -> its run, tags and model
        #: registered model name -> {"versions": [tags, ...] (version = index + 1), "aliases"}
        self.registry: dict[str, dict[str, Any]] = {}
        self._session_id: str | None = None
        self._experiment: str | None = None
        self._open: set[str] = set()

    @property
    def session_id(self) -> str | None:
        return self._session_id

    def connect(self) -> None:
        self.events.append(("connect",))

    def _new(self, name: str, tags: Mapping[str, str], run_name: str) -> str:
        run_id = f"run{len(self.records):04d}"
        self.records[run_id] = {
            "experiment": name,
            "name": run_name,
            "status": "RUNNING",
            "start": time.time(),
            "tags": dict(tags),
            "params": {},
            "metrics": {},
        }
        self._open.add(run_id)
        return run_id

    def start_session(self, name: str, info: Mapping[str, Any]) -> str:
        self._experiment = name
        tags = {**context_tags(self.source), **session_tags(name, info)}
        number = 1 + sum(
            1
            for r in self.records.values()
            if r["experiment"] == name and r["tags"].get("searchlab.role") == "session"
        )
        self._session_id = self._new(name, tags, session_run_name(name, number, time.time()))
        self.events.append(("start_session", self._session_id))
        return self._session_id

    def attach(self, session_id: str, own: bool = False) -> None:
        self._experiment = self.records[session_id]["experiment"]
        self._session_id = session_id
        if own:
            self._open.add(session_id)
        self.events.append(("attach", session_id))

    def leave(self) -> None:
        if self._session_id is not None:
            self._open.discard(self._session_id)
        self.close_all("FAILED")

    def run_status(self, run_id: str) -> str | None:
        record = self.records.get(run_id)
        return str(record["status"]) if record is not None else None

    def tag_session(self, tags: Mapping[str, str]) -> None:
        if self._session_id is not None:
            self.records[self._session_id]["tags"].update({k: str(v) for k, v in tags.items()})

    def previous_session(self, name: str) -> str | None:
        earlier = [
            r.run_id
            for r in self.runs(name)
            if r.tags.get("searchlab.role") == "session" and r.run_id != self._session_id
        ]
        return earlier[-1] if earlier else None

    def reconcile(
        self,
        name: str,
        trials: Mapping[int, Mapping[str, Any]],
        *,
        session_dead: Callable[[RunRecord], bool],
    ) -> list[str]:
        changed = []
        for run in self.runs(name):
            if run.run_id == self._session_id or run.status != "RUNNING":
                continue
            if run.tags.get("searchlab.role") == "session":
                if session_dead(run):
                    self.records[run.run_id]["status"] = "FAILED"
                    changed.append(f"session {run.run_id}: FAILED")
                continue
            default = {"state": TrialState.FAILED}
            trial = trials.get(int(run.tags.get("searchlab.trial", -1))) or default
            if trial["state"] in (TrialState.RUNNING, TrialState.WAITING):
                continue
            status = RUN_STATUS.get(trial["state"], "FAILED")
            self.records[run.run_id]["status"] = status
            changed.append(f"trial run {run.run_id}: {status}")
        return changed

    def start_trial(
        self,
        number: int,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
    ) -> str:
        assert self._session_id is not None and self._experiment is not None
        all_tags = {**context_tags(self.source), **trial_tags(self._session_id, number, tags)}
        run_id = self._new(self._experiment, all_tags, run_name or trial_run_name(number))
        self.records[run_id]["params"] = {k: param_text(v) for k, v in params.items()}
        self.events.append(("start_trial", run_id, str(number)))
        return run_id

    def log_inputs(self, run_id: str, inputs: Sequence[DataInput]) -> None:
        assert run_id in self._open, f"log_inputs on closed run {run_id}"
        self.records[run_id].setdefault("inputs", []).extend(
            {"name": i.name, "context": i.context, "digest": i.digest} for i in inputs
        )
        self.events.append(("log_inputs", run_id, ",".join(i.context for i in inputs)))

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        assert run_id in self._open, f"log_epoch on closed run {run_id}"
        for k, v in metrics.items():
            self.records[run_id]["metrics"].setdefault(k, []).append((epoch, shown(k, v)))
        self.events.append(("log_epoch", run_id, str(epoch)))

    def end_trial(self, run_id: str, result: TrialResult) -> None:
        assert run_id in self._open, f"end_trial twice on {run_id}"
        record = self.records[run_id]
        record["tags"].update(result.tags)
        record["tags"]["searchlab.state"] = result.state.value
        if result.value is not None:
            record["metrics"]["objective"] = [(0, shown("objective", result.value))]
        if result.weights_path is not None:
            self.artifacts.setdefault(run_id, []).append(f"weights/{result.weights_path.name}")
        self._close(run_id, RUN_STATUS[result.state])
        self.events.append(("end_trial", run_id, result.state.value))

    def fail_trial(self, run_id: str, error: str) -> None:
        record = self.records[run_id]
        record["tags"].update(
            {"searchlab.state": TrialState.FAILED.value, "searchlab.error": error}
        )
        self._open.discard(run_id)
        record["status"] = "FAILED"
        self.events.append(("fail_trial", run_id))

    def pause_trial(self, run_id: str, note: str) -> None:
        assert run_id in self._open, f"pause_trial on closed run {run_id}"
        self.records[run_id]["tags"][PAUSED_TAG] = note
        self._close(run_id, "KILLED")
        self.events.append(("pause_trial", run_id))

    def resume_trial(self, run_id: str, tags: Mapping[str, str]) -> int:
        if run_id not in self.records:
            raise MissingRun(f"MLflow run {run_id} does not exist.")
        record = self.records[run_id]
        record["status"] = "RUNNING"
        record["tags"].update(tags)
        self._open.add(run_id)
        self.events.append(("resume_trial", run_id))
        steps = [step for step, _ in record["metrics"].get(EPOCH_METRIC, [])]
        return max(steps, default=0)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert self._session_id is not None
        name = f"{artifact_path}/{path.name}" if artifact_path else path.name
        self.artifacts.setdefault(self._session_id, []).append(name)

    def log_model(
        self,
        model: Any,
        sample: Any,
        *,
        requirements: Sequence[str],
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        trial_run: str | None = None,
    ) -> str:
        assert self._session_id is not None
        uri = f"models:/m-{len(self.models):04d}"
        metrics = (
            {m: v[-1][1] for m, v in self.records[trial_run]["metrics"].items()}
            if trial_run is not None
            else {}
        )
        self.models[uri] = {
            "run_id": self._session_id,
            "tags": dict(tags),
            "model": model,
            "params": {k: param_text(v) for k, v in (params or {}).items()},
            "metrics": metrics,
        }
        self.records[self._session_id]["tags"][MODEL_URI_TAG] = uri
        self.events.append(("log_model", self._session_id, uri))
        return uri

    def register_model(
        self, model_uri: str, name: str, score: ModelScore, tags: Mapping[str, str] | None = None
    ) -> Registration:
        tags = dict(tags or {})
        entry = self.registry.setdefault(name, {"versions": [], "aliases": {}})
        current = entry["aliases"].get(CHAMPION)
        old_tags = entry["versions"][int(current) - 1] if current else None
        move, reason = champion_move(score, tags.get(TRIAL_RUN_TAG), old_tags)
        version = current
        if move != "same":
            entry["versions"].append({**tags, **score_tags(score), "source": model_uri})
            version = str(len(entry["versions"]))
        if move == "move":
            entry["aliases"][CHAMPION] = version
        old = score_of(old_tags or {})
        return Registration(
            name=name,
            version=str(version),
            champion=move in ("move", "same"),
            previous_version=current,
            previous_value=old.value if old is not None else None,
            reason=reason,
        )

    def download(self, run_id: str, path: str, dst: Path | None = None) -> Path:
        raise FileNotFoundError(f"MemoryTracker keeps no files: {run_id}/{path}")

    def end_session(self, summary: Mapping[str, Any], status: str = "FINISHED") -> None:
        if self._session_id is None:
            return
        self.records[self._session_id]["summary"] = dict(summary)
        self.events.append(("end_session", self._session_id, status))
        self.close_all(status)

    def close_all(self, status: str = "FAILED") -> None:
        for run_id in sorted(self._open, key=lambda r: r == self._session_id):
            self._close(run_id, status if run_id == self._session_id else "FAILED")

    def _close(self, run_id: str, status: str) -> None:
        if run_id in self._open:
            self._open.discard(run_id)
            self.records[run_id]["status"] = status

    def runs(self, name: str) -> list[RunRecord]:
        return [
            RunRecord(
                run_id=k,
                name=r["name"],
                status=r["status"],
                start_time=r["start"],
                tags=dict(r["tags"]),
                params=dict(r["params"]),
                metrics={m: v[-1][1] for m, v in r["metrics"].items()},
                inputs=tuple(r.get("inputs", ())),
            )
            for k, r in self.records.items()
            if r["experiment"] == name
        ]
