"""``searchlab run STUDY [--workers N]``: worker processes share one study on this machine.

A plain ``searchlab run`` is this with one worker: its trials run in a child process that
is replaced when it has grown (see Memory below), so a long search keeps flat memory.

This process (the launcher) opens the stores, closes what a crashed session left open and
starts the session's parent MLflow run; then it starts N copies of ``searchlab run`` that
attach to that parent run (their ``RunOptions`` as JSON in the hidden ``--worker-options``), so every worker's trials are child runs
of the same parent.  The workers share the study through its Optuna storage: the default
SQLite file (one machine; claims are serialised by a file lock and SQLite's own locking,
WAL journal) or PostgreSQL (several machines).  With ``--gpus`` each worker sees one GPU
through ``CUDA_VISIBLE_DEVICES``.  When the workers are done the launcher writes the summary,
the trials table and the best model on the parent run and closes it.

Workers are processes, not threads: Keras/TensorFlow keep global state per process, a
crashed worker cannot take the others down, and a GPU is pinned before its framework loads.
Memory: Keras/TensorFlow keep a few MB per trial that ``clear_session`` does not give back
(``scripts/bench_memory.py``), so a worker whose memory grew by more than ``--recycle-mb``
since its first trial ends itself between two trials (exit code ``RECYCLE``) and the launcher
starts a fresh one; the study, in the stores, does not notice.  On TensorFlow that is about
5 MB per trial that no ``clear_session``/``gc`` gets back (a bare Keras build/fit/clear loop
shows it too); on JAX it is under 1 MB, so there a worker is rarely replaced.

Output: the launcher copies each worker's stdout and stderr to its own, line by line, so
the user (or a caller that captures the launcher's output) sees every trial.  A worker dies
with its launcher (``PR_SET_PDEATHSIG`` on Linux, a watchdog thread elsewhere): a
``kill -9`` of ``searchlab run`` leaves no orphan training on, as it would with one process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from searchlab import config, interrupts
from searchlab.errors import SearchlabError, StudyDefinitionError

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import Tracker
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)
#: how long the launcher waits for a worker it passed Ctrl-C or SIGTERM on before it kills it.
#: What a stop takes: the worker ends its training batch (a trial's first, which compiles the
#: model, or a feature-cache pass over a batch, takes longest), finishes the checkpoint in
#: flight and closes its trial's runs; then the launcher closes the session.  That is a few
#: seconds on an idle machine (1-8 s in the tests on 2 cores), more under load -- 34-82 s
#: were measured on a 2-core machine shared with other jobs.  The bound: ``STOP_GRACE_S`` for
#: the worker, plus the launcher's close of the session (seconds; its store writes retry for
#: up to ``MLFLOW_HTTP_REQUEST_TIMEOUT`` on an MLflow server) -- about 70 s on a loaded
#: machine, so a scheduler's grace period (SLURM's ``KillWait``, Kubernetes'
#: ``terminationGracePeriodSeconds``) should be 90 s or more where nodes are shared.  A
#: worker killed at the bound still leaves its trial resumable from its last checkpoint.
STOP_GRACE_S = 60.0
#: a worker's exit code when it ended itself to shed memory (``--recycle-mb``): restart it
RECYCLE = 75
#: the launcher's process id, in each worker's environment (see :func:`bind_to_launcher`)
LAUNCHER_ENV = "SEARCHLAB_LAUNCHER_PID"


def parse_gpus(value: str | None) -> list[str] | None:
    """``--gpus``: None, ``auto`` (every GPU ``nvidia-smi`` lists) or ``0,1,...``."""
    if value is None or value == "":
        return None
    if value == "auto":
        found = detect_gpus()
        if not found:
            raise StudyDefinitionError(
                "--gpus auto found no GPU (nvidia-smi is missing or lists none); pass the "
                "GPU indices (--gpus 0,1) or leave --gpus out to run on the CPU."
            )
        return found
    parts = [p.strip() for p in value.split(",")]
    if not parts or not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise StudyDefinitionError(
            f"--gpus must be 'auto' or distinct GPU indices like 0,1,2; got {value!r}."
        )
    return parts


def detect_gpus() -> list[str]:
    """GPU indices from ``nvidia-smi`` (no framework is imported here)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def worker_env(
    index: int, gpus: Sequence[str] | None, *, storage: str, tracking_uri: str
) -> dict[str, str]:
    """The environment of worker ``index``: the stores (in the environment, so a password
    in a URL does not show in the process list), unbuffered output, its GPU when pinned."""

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[LAUNCHER_ENV] = str(os.getpid())
    env[config.STORAGE_ENV] = storage
    env[config.TRACKING_ENV] = tracking_uri
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def run(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    listener: SearchListener,
    *,
    workers: int,
    gpus: Sequence[str] | None,
    worker_command: Callable[[int, str], list[str]],
) -> dict[str, Any]:
    """Run ``study`` with ``workers`` processes; ``worker_command(index, parent_run_id)`` is
    the command line of worker ``index`` (a ``searchlab run`` with ``--worker-options``)."""
    from searchlab import data as data_mod
    from searchlab import runner

    # once here, not in every worker; a missing dataset fails before any store write
    engine, target, loaded = runner.prepare(study, options)
    interrupts.check()  # one dropped while the data loaded: stop before a store is touched
    settings = runner.result_settings(study, options, loaded.data)
    session = runner.Session.open(
        study, options, tracker, engine, target, loaded.data.source, settings
    )
    del loaded  # the workers load the data; this process holds no copy
    data_mod.forget()
    pool = _Pool(
        lambda: session.run_id, workers, gpus, options.storage, tracker.uri, worker_command
    )
    specs: list[TrialSpec] = []  # loaded again only for --reeval-top or the best model

    def spec() -> TrialSpec:
        if not specs:
            specs.append(runner.trial_spec(study, options))
        return specs[0]

    def search() -> None:
        if workers > 1 or gpus:  # a plain run's one worker leaves the runs as one process would
            tracker.tag_session(
                {
                    "searchlab.workers": str(workers),
                    "searchlab.gpus": ",".join(gpus) if gpus else "",
                }
            )
        pool.run()

    return session.lifecycle(listener, search, spec=spec, counts=session.counts, stop=pool.stop)


class _Pool:
    """The launcher's worker processes and the threads that relay their output;
    ``parent_run_id()`` is the session's parent run, which each worker attaches to."""

    def __init__(
        self,
        parent_run_id: Callable[[], str],
        workers: int,
        gpus: Sequence[str] | None,
        storage: str,
        tracking_uri: str,
        worker_command: Callable[[int, str], list[str]],
    ) -> None:
        self.parent_run_id, self.workers, self.gpus = parent_run_id, workers, gpus
        self.storage, self.tracking_uri, self.worker_command = storage, tracking_uri, worker_command
        self.live = workers == 1 and _isatty(sys.stdout)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relays: dict[int, list[threading.Thread]] = {}  # worker index -> its relays
        self.errors: dict[int, list[str]] = {}  # worker index -> its "error: ..." lines

    def start(self, index: int) -> subprocess.Popen[bytes]:
        cmd = self.worker_command(index, self.parent_run_id())
        log.info("starting worker %s: %s", index + 1, " ".join(cmd))
        # Own session: a Ctrl-C reaches the launcher only, which interrupts each worker once.
        env = worker_env(index, self.gpus, storage=self.storage, tracking_uri=self.tracking_uri)
        if self.live:  # one worker on a terminal: its progress line is passed through as it is
            env[config.TTY_ENV] = "1"
        proc = subprocess.Popen(
            cmd,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        errors = self.errors[index] = []
        self.relays.setdefault(index, []).extend(
            (_relay(proc.stdout, sys.stdout), _relay(proc.stderr, sys.stderr, errors))
        )
        return proc

    def run(self) -> None:
        """Start every worker and wait for them all (``_wait``)."""
        self.procs.extend(self.start(index) for index in range(self.workers))
        _wait(
            self.procs,
            self.start,
            lambda index: _worker_error(self.relays[index], self.errors[index]),
        )

    def stop(self) -> None:
        """Stop the workers still running (``_stop``) and let their output drain."""
        _stop(self.procs)
        for relay in (r for rs in self.relays.values() for r in rs):
            relay.join(timeout=5)


def _worker_error(relays: list[threading.Thread], lines: list[str]) -> str | None:
    """The one-line error a stopped worker printed (its ``error: ...`` line), if any;
    ``relays`` are that worker's output relays."""
    for relay in relays:  # the worker has ended: let its output drain
        relay.join(timeout=2)
    return lines[-1] if lines else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _relay(source: IO[bytes], target: IO[str], errors: list[str] | None = None) -> threading.Thread:
    """Copy a worker's output to this process's ``target`` stream as it comes: up to each
    end of line or carriage return (a progress line the worker rewrites in place).  With
    ``errors`` (its stderr), line by line, and its ``error: ...`` lines are kept there
    instead of printed: the launcher says them once, as its own error."""

    def write(text: str) -> None:
        try:
            target.write(text)
            target.flush()
        except (OSError, ValueError):  # our own output is gone: keep draining
            pass

    def pieces() -> None:
        with source:
            pending = b""
            read = getattr(source, "read1", source.readline)
            for chunk in iter(lambda: read(65536), b""):
                pending += chunk
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                if cut:  # whole characters: no UTF-8 sequence holds either byte
                    write(pending[:cut].decode("utf-8", errors="replace"))
                    pending = pending[cut:]
            if pending:
                write(pending.decode("utf-8", errors="replace"))

    def copy() -> None:
        with source:
            for raw in iter(source.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if errors is not None and line.startswith("error: "):
                    errors.append(line[len("error: ") :].strip())
                    continue
                write(line)

    thread = threading.Thread(
        target=copy if errors is not None else pieces, name="searchlab-relay", daemon=True
    )
    thread.start()
    return thread


def bind_to_launcher() -> None:
    """In a worker: end this process when its launcher ends, however that happens (a
    ``kill -9`` of ``searchlab run`` must not leave a worker training on its own)."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if not launcher.isdigit():
        return
    pid = int(launcher)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us with it
        except (OSError, AttributeError):
            pass
    if os.getppid() != pid:  # it died before we got here
        os._exit(1)
    if not sys.platform.startswith("linux"):

        def watch() -> None:
            while os.getppid() == pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="searchlab-launcher-watch", daemon=True).start()


def _wait(
    procs: list[subprocess.Popen[bytes]],
    start: Callable[[int], subprocess.Popen[bytes]],
    error_of: Callable[[int], str | None],
) -> None:
    """Wait for every worker, restarting the ones that recycled themselves; the first that
    fails stops the others and the session, with its error as the session's."""
    while True:
        interrupts.check()  # a Ctrl-C that was lost on its way stops the workers here
        for index, p in enumerate(procs):
            if p.poll() == RECYCLE:
                log.info(
                    "worker %s recycled itself to free memory; starting a fresh one", index + 1
                )
                procs[index] = start(index)
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, RECYCLE)]
        if failed:
            index, code = failed[0]
            _stop(procs)
            if code == 130:
                raise KeyboardInterrupt
            error = error_of(index)
            if error and len(procs) == 1:
                raise SearchlabError(error)
            raise SearchlabError(
                f"Worker {index + 1} of {len(procs)} stopped"
                + (f": {error} " if error else f" with exit code {code} (see its output above); ")
                + ("The other workers were stopped. " if len(procs) > 1 else "")
                + "Finished trials are kept: fix the cause and run the same command to continue."
            )
        if all(c == 0 for c in codes):
            return
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Interrupt the workers still running (each closes its trial), then wait; kill the
    ones that do not stop within ``STOP_GRACE_S`` (the next session fails their trials).
    SIGTERM, which a worker treats like Ctrl-C: SIGINT may be ignored by processes a
    non-interactive shell started in the background.  A Ctrl-C while waiting is the
    second one, which ``interrupts`` ignores (a third ends this process, and the kernel then
    ends the workers: ``bind_to_launcher``)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
