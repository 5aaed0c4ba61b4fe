"""One exception root for everything searchlab raises on purpose.

User errors (a bad study file, an impossible space, missing data, an unreachable store) stop
the run: the CLI prints their message as one line and exits non-zero.  ``TrialFailed`` is
different: it fails one trial and the study goes on.
"""

from __future__ import annotations

import urllib.parse


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
