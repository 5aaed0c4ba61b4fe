"""Ctrl-C (SIGINT) and SIGTERM at many points of a run, in-process and with a worker: every
one ends the run within ``BOUND_S`` seconds with exit code 130 and one ``error:`` line, and
leaves both stores closed (no trial RUNNING or WAITING, no MLflow run RUNNING, every complete
trial with its weights).

Points a test cannot hit by timing are hit from inside: the study file below, given
``$SEARCHLAB_TEST_SIGNAL_AT``, makes the process signal itself there -- inside a garbage
collection callback of its first build (where Python drops the ``KeyboardInterrupt``), in the
middle of the weights upload, between a claim's enqueue and ask, while the session run is
being closed.  The others are sent by the test: in the first half second of the first trial,
and twice in a row in the middle of a fit.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from reliability_helpers import STUDY, Session, check_closed, env_for, searchlab_cmd

pytestmark = pytest.mark.slow
#: the longest a signal may take to end a run here (measured: 1-4 s; the bound leaves room
#: for a loaded 2-core machine)
BOUND_S = 20.0

#: Appended to the tiny study: where $SEARCHLAB_TEST_SIGNAL_AT says, the process whose role
#: ($SEARCHLAB_TEST_SIGNAL_IN: launcher or worker) matches sends itself
#: $SEARCHLAB_TEST_SIGNAL once, writing the time to $SEARCHLAB_TEST_SIGNAL_SENT first.
HOOKS = """

import gc
import signal as _signal
import sys

_AT = os.environ.get("SEARCHLAB_TEST_SIGNAL_AT", "")
_ROLE = "worker" if "--worker-options" in sys.argv else "launcher"
_MINE = os.environ.get("SEARCHLAB_TEST_SIGNAL_IN", "launcher") == _ROLE
_FIRED = []


def _send():
    if _FIRED or not _MINE:
        return
    _FIRED.append(1)
    Path(os.environ["SEARCHLAB_TEST_SIGNAL_SENT"]).write_text(repr(time.time()))
    os.kill(os.getpid(), getattr(_signal, os.environ["SEARCHLAB_TEST_SIGNAL"]))
    time.sleep(0.3)  # the handler runs here, inside whatever called _send


if _AT == "upload":
    import mlflow.tracking

    _log_artifact = mlflow.tracking.MlflowClient.log_artifact

    def _upload(self, run_id, local_path, artifact_path=None):
        if artifact_path == "weights":
            _send()
        return _log_artifact(self, run_id, local_path, artifact_path)

    mlflow.tracking.MlflowClient.log_artifact = _upload
elif _AT == "close":
    from searchlab import tracking as _tracking

    _end_session = _tracking.MlflowTracker.end_session

    def _closing(self, summary, status="FINISHED"):
        _send()
        return _end_session(self, summary, status)

    _tracking.MlflowTracker.end_session = _closing
elif _AT == "claim":
    import optuna

    _ask = optuna.Study.ask

    def _asking(self, *args, **kwargs):
        _send()  # the grid point is enqueued, not yet asked for
        return _ask(self, *args, **kwargs)

    optuna.Study.ask = _asking

_build = build


def _in_a_trial():  # not the launcher's check of one model before the search
    import inspect

    return any(frame.function == "run_trial" for frame in inspect.stack())


def build(params, info):
    if _AT == "gc" and not _FIRED and _in_a_trial():
        def _in_gc(phase, _info):
            if phase == "start":
                _send()  # Python runs the handler inside this gc callback

        gc.callbacks.append(_in_gc)
        gc.collect()
        gc.callbacks.remove(_in_gc)
    return _build(params, info)


import dataclasses

study = dataclasses.replace(study, model=build)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


CASES = {
    # name: (mode, where, signal(s), who gets it)
    "in-process first trial": ("in-process", "first-trial", "SIGINT", "launcher"),
    "in-process gc callback": ("in-process", "gc", "SIGTERM", "launcher"),
    "in-process weights upload": ("in-process", "upload", "SIGINT", "launcher"),
    "in-process claim": ("in-process", "claim", "SIGINT", "launcher"),
    "in-process session close": ("in-process", "close", "SIGTERM", "launcher"),
    "in-process twice in fit": ("in-process", "fit", "SIGINT SIGTERM", "launcher"),
    "worker gc callback": ("worker", "gc", "SIGTERM", "worker"),
    "launcher first trial": ("worker", "first-trial", "SIGINT", "launcher"),
    "launcher session close": ("worker", "close", "SIGINT", "launcher"),
    "launcher twice in fit": ("worker", "fit", "SIGTERM SIGTERM", "launcher"),
}


def test_a_signal_ends_the_run_with_130_and_closes_everything(tmp_path: Path, data_dir) -> None:
    """Every case of ``CASES``, two at a time (each is a few processes that mostly wait for
    TensorFlow to import); each case's failure is reported with its name."""
    import traceback
    from concurrent.futures import ThreadPoolExecutor

    os.environ["SEARCHLAB_DATA_DIR"] = str(data_dir)

    def one(case: str) -> str | None:
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        try:
            _case(folder, case)
        except Exception:
            return f"{case}:\n{traceback.format_exc()}"
        return None

    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(one, CASES) if f]
    assert not failures, "\n\n".join(failures)


def _case(project: Path, case: str) -> None:
    mode, where, signals, who = CASES[case]
    home = project / ".searchlab"
    study = project / "tiny_study.py"
    study.write_text(STUDY + HOOKS)
    sent_file = project / "sent"
    marker = project / "in-fit"
    extra = {
        "SEARCHLAB_TEST_SIGNAL_AT": where,
        "SEARCHLAB_TEST_SIGNAL": signals.split()[0],
        "SEARCHLAB_TEST_SIGNAL_IN": who,
        "SEARCHLAB_TEST_SIGNAL_SENT": str(sent_file),
    }
    if where == "fit":
        extra["SEARCHLAB_TEST_HANG"] = str(marker)
    args = ["--trials", "2", *(["--in-process"] if mode == "in-process" else [])]
    s = Session(searchlab_cmd(study, *args), env_for(home, **extra), project)

    def target() -> int:
        if who == "launcher":
            return s.proc.pid
        deadline = time.monotonic() + 30
        while not (kids := _children(s.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kids, "no worker process"
        return kids[0]

    sent: float | None = None
    if where == "first-trial":
        s.wait_for(lambda line: "trial 1 of" in line)
        time.sleep(random.uniform(0.0, 0.5))
        pid = target()
        sent = time.time()
        os.kill(pid, getattr(signal, signals.split()[0]))
    elif where == "fit":
        s.wait_for_file(marker)
        pid = target()
        sent = time.time()
        for name in signals.split():
            os.kill(pid, getattr(signal, name))
            time.sleep(0.1)
    out = s.finish(timeout=240)
    ended = time.time()
    if sent is None:
        assert sent_file.exists(), f"the study never reached {where!r}:\n{out}"
        sent = float(sent_file.read_text())
    took = ended - sent

    assert s.proc.returncode == 130, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert errors == [
        "error: interrupted; finished trials are kept, run the same command to continue."
    ], out
    assert "Traceback" not in out and "Exception ignored" not in out, out
    assert took < BOUND_S, f"{case}: {took:.1f} s from the signal to the exit"
    found = check_closed(home, "tiny")
    states = [t.state.name for t in found["trials"]]
    (session,) = found["sessions"]
    if where == "close":  # the search was over: it closed as finished, then stopped
        assert states == ["COMPLETE", "COMPLETE"] and session.info.status == "FINISHED", states
    else:
        assert session.info.status == "KILLED", session.info.status
        assert "FAIL" in states or where == "upload", states
    if where == "upload":  # the interrupted upload was finished first
        assert states[0] == "COMPLETE", states
    if where in ("claim", "gc", "first-trial", "fit"):
        failed = [t for t in found["trials"] if t.state.name == "FAIL"]
        assert [t.user_attrs["error"] for t in failed] == ["interrupted (Ctrl-C)"], states
    print(f"{case}: exit 130 {took:.2f} s after the signal")
