"""What a user sees: per-epoch progress, one rewritten line per trial on a terminal (through
the launcher's worker) and plain lines otherwise; no TensorFlow, absl or oneDNN line on any
command's output, whatever TF_CPP_MIN_LOG_LEVEL says; ``report --json`` and ``--csv -``
print data that parses, and nothing else, on stdout."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, STUDIES

pytestmark = pytest.mark.slow
MNIST = STUDIES / "mnist_dense.py"
#: what TensorFlow, absl and oneDNN print on their own (glog-style lines, absl's notice)
BACKEND_NOISE = re.compile(
    r"absl|oneDNN|TF_ENABLE_ONEDNN_OPTS|cpu_feature_guard|port\.cc|^[IWEF]\d{4} ", re.M
)
TIMEOUT_S = 300


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI's own doing, not the caller's
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        SEARCHLAB_HOME=str(project / ".searchlab"),
    )
    return env


def _searchlab(*args: object) -> list[str]:
    return [sys.executable, "-m", "searchlab.cli", *map(str, args)]


def run_in_terminal(command: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr; return its exit
    code and everything it wrote there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd
    )
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the process has ended
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, out.decode("utf-8", errors="replace")


def test_a_terminal_sees_one_updating_line_per_trial_and_no_backend_lines(project: Path):
    run = _searchlab("run", MNIST, "--strategy", "random", "--trials", "2", "--epochs", "2")
    code, out = run_in_terminal([*run, "--subset", "300,100"], _env(project), project)
    assert code == 0, out
    assert not BACKEND_NOISE.search(out), out
    # the worker's line is rewritten in place: carriage return, clear to the end, new text
    epochs = re.findall(r"\r\x1b\[K  epoch (\d) of 2: loss=[^\r\n]*val_accuracy=\S+ \(", out)
    assert epochs == ["1", "2", "1", "2"], out
    assert "study ETA" in out
    lines = out.replace("\r\n", "\n").split("\n")
    trial_lines = [ln for ln in lines if "epoch 2 of 2" in ln]
    assert len(trial_lines) == 2  # one line per trial, which ends as its last epoch
    assert all(ln.count("epoch 1 of 2") == 1 for ln in trial_lines)
    assert "complete: val_accuracy=" in out and "at epoch" in out


def test_plain_lines_when_not_a_terminal_and_data_only_on_stdout(project: Path):
    env = _env(project)
    run = _searchlab("run", MNIST, "--strategy", "random", "--trials", "1", "--epochs", "2")
    done = subprocess.run(
        [*run, "--subset", "300,100"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not BACKEND_NOISE.search(done.stdout + done.stderr), done.stderr
    assert "\r" not in done.stdout
    assert re.search(
        r"^  epoch 1 of 2: loss=\S+ .*\(\d+\.\ds; study ETA \d+s\)$", done.stdout, re.M
    )
    assert re.search(r"^  epoch 2 of 2: ", done.stdout, re.M)

    for extra in (("--json",), ("--csv", "-")):
        shown = subprocess.run(
            _searchlab("report", MNIST, *extra),
            env=env,
            cwd=project,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert shown.returncode == 0, shown.stderr
        assert not BACKEND_NOISE.search(shown.stdout + shown.stderr), shown.stderr
        if extra == ("--json",):
            report = json.loads(shown.stdout)
            assert report["study"] == "mnist-dense" and report["direction"] == "maximize"
            (trial,) = report["trials"]
            assert trial["state"] == "complete" and trial["epochs"] == 2
            assert report["best"]["number"] == trial["number"] == 0
            assert report["best"]["model_uri"].startswith("models:/")
        else:
            (row,) = list(csv.DictReader(io.StringIO(shown.stdout)))
            assert row["state"] == "complete" and row["params.units"]

    exported = subprocess.run(
        _searchlab("export", MNIST, "-o", project / "best.keras"),
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert exported.returncode == 0, exported.stderr
    assert not BACKEND_NOISE.search(exported.stdout + exported.stderr), exported.stderr
