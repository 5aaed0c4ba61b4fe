"""Ctrl-C and SIGTERM: stop a run where its stores can be left consistent, and never lose one.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is, and a ``KeyboardInterrupt`` raised there goes wrong in two ways:

- inside a garbage-collection callback or a ``__del__`` it is printed as "Exception ignored
  in ..." and dropped, and training carries on (often in a process's first trial, which
  creates the most garbage);
- inside a store write (a claim between enqueue and ask, the weights upload, closing the
  session run) the write is cut in half and the stores disagree until the next run;
- inside a call into a C extension (TensorFlow's, while a trial builds or trains) it comes
  out as that call's ``SystemError`` ("returned a result with an exception set"), which a
  trial would record as its own failure: a trial calls ``check`` before it does.

The handler ``install`` puts on SIGINT and SIGTERM therefore records the signal first.  Outside
a ``deferred()`` block it raises ``KeyboardInterrupt`` at once, and ``check()`` -- called at
every batch, epoch, claim and launcher poll -- raises it again if it was dropped; inside one it
raises nothing and the block raises it when it ends.  Whoever catches the interrupt calls
``acknowledge()`` so that the clean-up it then does is not interrupted by the same signal.

Before ``install`` -- while the ``searchlab`` command is still importing -- ``guard_start``
(called by ``searchlab/__init__``) makes a signal end the process at once, exit code 130.

One signal stops the process; a second one while it stops is noted and ignored (the runs are
being closed, which takes a few seconds); a third ends the process at once with exit code 130
(``os._exit``), leaving what is still open to the next run's reconcile.  Signals only reach
the main thread, so a process that never called ``install`` (a notebook, a test calling the
runner) keeps Python's own Ctrl-C and every function here does nothing special.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: the exit code of an interrupted command (128 + SIGINT), whichever signal stopped it
EXIT_CODE = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received = 0  # signals since install()
_pending = False  # an interrupt is owed to the main thread: raised, but not yet caught
_depth = 0  # nesting of deferred() blocks


def _handler(signum: int, frame: Any) -> None:
    global _received, _pending
    _received += 1
    if _received >= 3:
        _say("interrupted again: stopping at once; the next run closes what is still open.")
        os._exit(EXIT_CODE)
    if _received == 2:
        _say("stopping: closing the open runs first (interrupt once more to quit at once).")
        return
    _pending = True
    if _depth == 0:
        raise KeyboardInterrupt


def _say(text: str) -> None:
    try:
        os.write(2, f"\nsearchlab: {text}\n".encode())
    except OSError:
        pass


def install() -> Callable[..., None]:
    """Handle SIGINT and SIGTERM as described above, in this (main) thread; return the
    function that puts the previous handlers back.  After an interrupt, that function leaves
    both signals ignored instead when the process is on its way out with exit code 130
    (``exiting``, the default): a late signal must not turn that into the signal's own exit
    status.  A process that goes on (a test runner, a notebook calling the CLI in-process)
    passes ``exiting=False`` and gets its own handlers back, so its next Ctrl-C works and the
    processes it starts do not inherit ignored signals."""
    global _received, _pending, _depth
    if threading.current_thread() is not threading.main_thread():
        return lambda exiting=True: None
    _received, _pending, _depth = 0, False, 0
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    hook = sys.unraisablehook

    def quiet(unraisable: Any) -> None:
        # an interrupt raised inside a gc callback or __del__ is dropped there, and Python
        # prints a traceback for it; the next check raises it again: nothing to print
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    sys.unraisablehook = quiet

    def restore(exiting: bool = True) -> None:
        global _received, _pending
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if _received and exiting else handler)
        if not exiting:  # the caller goes on: nothing of this interrupt may surface later
            _received, _pending = 0, False

    return restore


#: how the ``searchlab`` command starts: its console script, or ``python -m searchlab.cli``
#: (a worker, the tests)
COMMAND_NAMES = ("searchlab", "searchlab.exe")
COMMAND_MODULES = ("searchlab", "searchlab.cli")
STARTING = "interrupted while starting; nothing was run."


def _starting(signum: int, frame: Any) -> None:
    _say(STARTING)
    os._exit(EXIT_CODE)


def is_command() -> bool:
    """Whether this process is the ``searchlab`` command (not a notebook, a test runner or
    a user's script that imports searchlab)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if sys.argv and os.path.basename(sys.argv[0]) in COMMAND_NAMES:
        return True
    return any(a == "-m" and b in COMMAND_MODULES for a, b in zip(argv, argv[1:], strict=False))


def guard_start() -> None:
    """In the ``searchlab`` command only, from its first import on: Ctrl-C or SIGTERM before
    ``install`` (while Python imports searchlab, NumPy, click: a few seconds on a loaded
    machine) ends the process at once with one line and exit code 130 -- nothing was
    opened yet -- instead of a ``KeyboardInterrupt`` traceback and death by SIGINT.
    ``install`` replaces it; anywhere else (a notebook, pytest) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not is_command():
        return
    for sig in SIGNALS:
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(sig, _starting)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived and its interrupt was lost on the way
    (see the module doc); a safe point in the main thread calls this."""
    global _pending
    if _pending and _depth == 0 and threading.current_thread() is threading.main_thread():
        _pending = False
        raise KeyboardInterrupt


def acknowledge() -> None:
    """The interrupt was caught and is being handled: ``check`` must not raise it again."""
    global _pending
    _pending = False


@contextlib.contextmanager
def deferred(*, then_raise: bool = True) -> Iterator[None]:
    """A block that a signal does not cut short: an interrupt that arrives inside it is
    raised when it ends (unless it ends with an exception of its own), or with
    ``then_raise=False`` at the next ``check`` (when what follows must own it first: a
    claimed trial is failed by the trial's own first check)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if then_raise:
        check()


__all__ = ["EXIT_CODE", "acknowledge", "check", "deferred", "guard_start", "install"]
