"""One exception root for everything searchlab raises on purpose.

User errors (a bad study file, an impossible space, missing data, an unreachable store) stop
the run: the CLI prints their message as one line and exits non-zero.  ``TrialFailed`` is
different: it fails one trial and the study goes on.
"""

from __future__ import annotations

import errno
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator


def hide_password(text: str, url: str) -> str:
    """``text`` without the password ``url`` holds (a database URL or an ``http(s)://`` tracking
    server), as given or URL-decoded: drivers and servers quote what they were given."""
    try:
        password = urllib.parse.urlsplit(url).password if "@" in url else None
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***").replace(urllib.parse.unquote(password), "***")
    return text


class SearchlabError(Exception):
    """Root of every error searchlab raises on purpose."""


class StudyDefinitionError(SearchlabError, ValueError):
    """The study file cannot be loaded or does not define a valid study."""


class SpaceError(StudyDefinitionError):
    """A search space is impossible (low > high, empty choice, ...)."""


class DataError(SearchlabError, FileNotFoundError):
    """A dataset cannot be found or read."""


class StoreError(SearchlabError, ConnectionError):
    """An Optuna storage or MLflow tracking store cannot be reached or used."""


class NotRunError(SearchlabError, LookupError):
    """A study has no results to show: it was never run against the given stores."""


class ExportError(SearchlabError, LookupError):
    """There is nothing to export, or the export target is not usable."""


class SessionOver(SearchlabError):
    """A shared session (``searchlab run --session KEY``) has ended: its last process closed
    it, so a late one has nothing to do (not an error: the CLI exits 0)."""


class TrialFailed(SearchlabError):  # noqa: N818 - named like keras-tuner's FailedTrialError
    """One trial failed (NaN loss, builder error, out of memory); the study goes on."""


class TrialPruned(SearchlabError):  # noqa: N818
    """The pruner stopped one trial early, after epoch ``epoch`` (numbered from 1); it counts
    as pruned, not failed."""

    def __init__(self, epoch: int, message: str = "") -> None:
        super().__init__(message or f"pruned after epoch {epoch}")
        self.epoch = epoch


#: what SQLite (through SQLAlchemy, Optuna, MLflow) says for ENOSPC, and the OS's own words
DISK_FULL_WORDS = ("database or disk is full", "No space left on device", "Disk quota exceeded")


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, once each."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or one it comes from, says a disk (or a quota) is full: an
    ``OSError`` ENOSPC/EDQUOT, or SQLite's "database or disk is full" however wrapped
    (Optuna's ``StorageInternalError``, MLflow's ``MlflowException``, a ``StoreError``)."""
    for item in chain(exc):
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(item) for words in DISK_FULL_WORDS):
            return True
    return False


def full_disk_path(exc: BaseException, candidates: Iterable[str | os.PathLike[str]]) -> str:
    """Where the disk is full, for ``disk_full_line``: the file an ``OSError`` of the chain
    names, else the first of ``candidates`` (the stores' folders, the temporary folder, ...)
    whose file system has (almost) no free space left, else the first candidate."""
    import shutil

    for item in chain(exc):
        if isinstance(item, OSError) and item.filename:
            return os.fsdecode(item.filename)
        named = re.search(r"filename = '([^']+)'", str(item))  # HDF5 says it in its message
        if named:
            return named.group(1)
    paths = [os.fspath(c) for c in candidates]
    for path in paths:
        probe = path
        while probe and not os.path.exists(probe):
            parent = os.path.dirname(probe)
            probe = parent if parent != probe else ""
        try:
            if probe and shutil.disk_usage(probe).free < 1 << 20:
                return path
        except OSError:
            continue
    return paths[0] if paths else "the disk"


def disk_full_line(exc: BaseException, candidates: Iterable[str | os.PathLike[str]]) -> str:
    """The one line for a full disk: where, the words that said it, and the way out."""
    said = next(
        (w for item in chain(exc) for w in DISK_FULL_WORDS if w in str(item)),
        "No space left on device",
    )
    where = full_disk_path(exc, candidates)
    return (
        f"no space left on {where} ({said}); free some space (or move $SEARCHLAB_HOME, "
        "$TMPDIR to a larger disk) and run the same command again: finished trials are kept, "
        "the next run closes what this one could not."
    )
