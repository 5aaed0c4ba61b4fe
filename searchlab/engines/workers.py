"""``searchlab run STUDY --workers N``: N worker processes share one study on this machine.

This process (the launcher) opens the stores, closes what a crashed session left open and
starts the session's parent MLflow run; then it starts N copies of ``searchlab run`` that
attach to that parent run (hidden ``--parent-run``), so every worker's trials are child runs
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
starts a fresh one; the study, in the stores, does not notice.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from searchlab.engines import coordination
from searchlab.errors import SearchlabError, StudyDefinitionError

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker

log = logging.getLogger(__name__)
STOP_GRACE_S = 60.0
#: a worker's exit code when it ended itself to shed memory (``--recycle-mb``): restart it
RECYCLE = 75


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
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def worker_env(
    index: int, gpus: Sequence[str] | None, *, storage: str, tracking_uri: str
) -> dict[str, str]:
    """The environment of worker ``index``: the stores (in the environment, so a password
    in a URL does not show in the process list), unbuffered output, its GPU when pinned."""
    from searchlab import config

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[config.STORAGE_ENV] = storage
    env[config.TRACKING_ENV] = tracking_uri
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def run(
    study: Study,
    options: RunOptions,
    tracker: MlflowTracker,
    listener: SearchListener,
    *,
    workers: int,
    gpus: Sequence[str] | None,
    worker_command: Callable[[int, str], list[str]],
) -> dict[str, Any]:
    """Run ``study`` with ``workers`` processes; ``worker_command(index, parent_run_id)`` is
    the command line of worker ``index`` (a ``searchlab run`` with ``--parent-run``)."""
    from searchlab.engines import check_pruning
    from searchlab.engines import optuna as engine

    check_pruning(options)  # once here, not in every worker
    engine.budget(study, options)
    spec = engine.trial_spec(study, options)  # a missing dataset fails before any store write
    session = engine.open_session(study, options, tracker, spec.data.source)
    tracker.set_session_tags({"searchlab.workers": str(workers),
                              "searchlab.gpus": ",".join(gpus) if gpus else ""})
    listener.started(study.name, session.finished_count(), session.target, session.info)
    status = "FAILED"
    procs: list[subprocess.Popen[bytes]] = []

    def start(index: int) -> subprocess.Popen[bytes]:
        cmd = worker_command(index, session.run_id)
        log.info("starting worker %s: %s", index + 1, " ".join(cmd))
        # Own session: a Ctrl-C reaches the launcher only, which interrupts each worker once.
        return subprocess.Popen(
            cmd,
            env=worker_env(index, gpus, storage=options.storage, tracking_uri=tracker.uri),
            start_new_session=True,
        )

    try:
        procs.extend(start(index) for index in range(workers))
        _wait(procs, start)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _stop(procs)
        raise
    finally:
        _stop(procs)
        counts = _session_counts(session)
        summary = engine.close_session(session, status, counts, spec)
        listener.finished(summary)
    return summary


def _wait(
    procs: list[subprocess.Popen[bytes]], start: Callable[[int], subprocess.Popen[bytes]]
) -> None:
    """Wait for every worker, restarting the ones that recycled themselves; the first that
    fails stops the others and the session."""
    while True:
        for index, p in enumerate(procs):
            if p.poll() == RECYCLE:
                log.info("worker %s recycled itself to free memory; starting a fresh one", index + 1)
                procs[index] = start(index)
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, RECYCLE)]
        if failed:
            index, code = failed[0]
            _stop(procs)
            if code == 130:
                raise KeyboardInterrupt
            raise SearchlabError(
                f"Worker {index + 1} of {len(procs)} stopped with exit code {code} (its error "
                "is printed above); the other workers were stopped. Finished trials are "
                "kept: fix the cause and run the same command to continue."
            )
        if all(c == 0 for c in codes):
            return
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Interrupt the workers still running (each closes its trial), then wait; kill the
    ones that do not stop within ``STOP_GRACE_S`` (the next session fails their trials).
    SIGTERM, which a worker treats like Ctrl-C: SIGINT may be ignored by processes a
    non-interactive shell started in the background."""
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
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            for q in alive:
                if q.poll() is None:
                    q.kill()
            raise


def _session_counts(session: Any) -> dict[str, int]:
    from optuna.trial import TrialState as OptunaState

    names = {OptunaState.COMPLETE: "complete", OptunaState.PRUNED: "pruned",
             OptunaState.FAIL: "failed"}
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    for t in session.ostudy.get_trials(deepcopy=False):
        if t.user_attrs.get(coordination.SESSION_ATTR) == session.run_id and t.state in names:
            counts[names[t.state]] += 1
    return counts
