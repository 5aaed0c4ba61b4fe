"""``searchlab.interrupts`` on its own, with real signals sent to this process: a dropped
interrupt is raised again at the next check, a deferred block is never cut, later signals
do not cut the clean-up, the third one ends the process with 130."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from reliability_helpers import _default_sigint

from searchlab import interrupts


@pytest.fixture
def installed() -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
    restore = interrupts.install()
    try:
        yield
    finally:
        restore()
        for sig, handler in previous.items():  # this test process keeps its own Ctrl-C
            signal.signal(sig, handler)


def _signal(sig: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs on the main thread here


def test_an_interrupt_dropped_in_a_gc_callback_is_raised_at_the_next_check(installed) -> None:
    def in_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _signal()

    gc.callbacks.append(in_gc)
    try:
        gc.collect()  # the KeyboardInterrupt raised in the callback is dropped by Python
    finally:
        gc.callbacks.remove(in_gc)
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.check()  # raised once, not twice


def test_a_deferred_block_runs_to_its_end(installed) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            _signal(signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]


def test_a_claim_leaves_the_interrupt_to_whoever_owns_the_trial(installed) -> None:
    with interrupts.deferred(then_raise=False):
        _signal()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_once_caught_later_signals_do_not_cut_the_clean_up(installed) -> None:
    with pytest.raises(KeyboardInterrupt):
        _signal()
    interrupts.acknowledge()
    _signal(signal.SIGINT)  # the second: noted, ignored
    interrupts.check()
    with interrupts.deferred():
        pass


def test_the_third_signal_ends_the_process_with_130() -> None:
    code = (
        "import os, signal, time\n"
        "from searchlab import interrupts\n"
        "interrupts.install()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
        "except KeyboardInterrupt:\n"
        "    interrupts.acknowledge()\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "raise SystemExit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert "stopping at once" in done.stderr


def test_after_an_interrupt_a_late_signal_cannot_change_the_exit_status() -> None:
    code = (
        "import os, signal, time, sys\n"
        "from searchlab import interrupts\n"
        "restore = interrupts.install()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
        "except KeyboardInterrupt:\n"
        "    interrupts.acknowledge()\n"
        "restore()  # the command is over; exiting takes a while\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
        "sys.exit(130)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, (done.returncode, done.stderr)


@pytest.mark.parametrize("error", [SystemError, OSError])
def test_an_interrupt_a_c_call_turned_into_its_error_stops_the_trial(
    installed, tmp_path, error
) -> None:
    """A signal that lands inside a call into a C extension (TensorFlow's) comes out as that
    call's error ("returned a result with an exception set"): the trial raises the
    interrupt, it does not record that error as its own failure and go on."""
    import numpy as np

    from searchlab.data import Data
    from searchlab.training import TrialSpec, run_trial

    def build(hp):
        try:
            _signal(signal.SIGINT)
        except KeyboardInterrupt as exc:  # what a C call returning with it set raises
            raise error("<built-in method> returned a result with an exception set") from exc
        raise AssertionError("the signal did not arrive")

    x = np.zeros((4, 3), "float32")
    y = np.zeros((4,), "int32")
    data = Data(x_train=x, y_train=y, x_val=x, y_val=y, x_test=x[:0], y_test=y[:0], num_classes=2)
    spec = TrialSpec(build=build, data=data, epochs=1, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_trial(0, {}, spec, tmp_path)


#: put first on PYTHONPATH: the command receives SIGINT while it imports NumPy (the first
#: heavy import of ``import searchlab``), as a Ctrl-C in the first seconds of a run does
SIGINT_DURING_IMPORT = """
import importlib.abc, os, signal, sys


class _Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, _Interrupt())
"""


def _interrupted_while_importing(tmp_path, command: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(SIGINT_DURING_IMPORT)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    # as from a terminal: a test process started in the background (CI) ignores SIGINT, and
    # its children would inherit that
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_default_sigint
    )


@pytest.mark.parametrize("how", ["module", "script"])
def test_ctrl_c_while_the_command_imports_exits_130_quietly(tmp_path, how: str) -> None:
    """``searchlab`` (its console script, or ``python -m searchlab.cli`` as a worker runs)
    interrupted before its handler is installed: one line, exit code 130, no traceback."""
    if how == "module":
        command = [sys.executable, "-m", "searchlab.cli", "--help"]
    else:  # a console script named searchlab, as pip writes it
        script = tmp_path / "searchlab"
        script.write_text("import sys\nfrom searchlab.cli import main\nsys.exit(main())\n")
        command = [sys.executable, str(script), "--help"]
    done = _interrupted_while_importing(tmp_path, command)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.strip() == f"searchlab: {interrupts.STARTING}"


def test_importing_searchlab_elsewhere_keeps_pythons_ctrl_c(tmp_path) -> None:
    """A user's script (or a notebook) that imports searchlab keeps Python's own Ctrl-C."""
    done = _interrupted_while_importing(tmp_path, [sys.executable, "-c", "import searchlab"])
    assert done.returncode != 130 and "KeyboardInterrupt" in done.stderr


def test_an_in_process_command_that_was_interrupted_gives_the_signals_back() -> None:
    """The CLI called in-process (a test, a notebook) and stopped by Ctrl-C: the caller gets
    its own SIGINT and SIGTERM handlers back, not ignored signals -- its next Ctrl-C must
    work, and a process it starts must not inherit an ignored SIGINT (which made the
    import-time Ctrl-C tests above fail after an earlier in-process interrupt)."""
    import click
    from click.testing import CliRunner

    from searchlab.cli import SearchlabGroup

    group = SearchlabGroup("searchlab")

    @group.command()
    def stop() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler raises here
        click.echo("not interrupted")

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    result = CliRunner().invoke(group, ["stop"])
    assert result.exit_code == interrupts.EXIT_CODE, result.output
    assert "not interrupted" not in result.output
    assert {sig: signal.getsignal(sig) for sig in before} == before
    interrupts.check()  # nothing of that interrupt is left pending for the caller
