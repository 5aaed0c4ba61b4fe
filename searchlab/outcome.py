"""The plain records that pass between the layers: what an engine proposes for the next
trial (``Proposal``, ``Claim``), a trial's state and what it produced (``TrialState``,
``TrialResult``).  Plain Python, so the stores, the tracker and the CLI read them without
importing Keras or Optuna."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the tag that says why a trial (and, once per session, the study) trained without the
#: feature cache: a ``cache.Reason``'s text, a colon, what to change
CACHE_REASON_TAG = "searchlab.cache.reason"
#: reasons of trials whose cache nobody asked for (the study turned it off; the model freezes
#: nothing): logged at info level, and no cache columns in the trials table for them
CACHE_DISABLED = "cache=False"
CACHE_NO_FROZEN = "no frozen layers"


def cache_off_by_choice(reason: str) -> bool:
    """Whether a ``CACHE_REASON_TAG`` value says that nothing asked for the cache."""
    return reason.startswith((CACHE_DISABLED, CACHE_NO_FROZEN))


class TrialState(enum.Enum):
    """A trial's state in searchlab's words; the stores map it to their own.  A trial ends
    COMPLETE, PRUNED or FAILED (``TrialResult.state``); the store also holds RUNNING trials
    and WAITING ones (enqueued, not started)."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    RUNNING = "running"
    WAITING = "waiting"

    @property
    def finished(self) -> bool:
        """Counts towards the budget: complete or pruned."""
        return self in (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TrialResult:
    """What one trial produced. ``history`` maps a metric name to its value per epoch;
    ``best_epoch`` is the number of the best epoch, from 1 (as every epoch a user sees)."""

    number: int
    params: dict[str, Any]
    state: TrialState
    value: float | None = None
    best_epoch: int | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    weights_path: Path | None = None
    duration: float = 0.0
    fit_seconds: float = 0.0
    error: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    #: failed before its first epoch ended (at build, or on the first step): the runner stops
    #: a session whose first trials fail that way alike (``runner.failure_streak``)
    early: bool = False
    #: the likely fix of an early failure, where the trial can tell (one sentence)
    hint: str | None = None

    @property
    def epochs_run(self) -> int:
        return max((len(v) for v in self.history.values()), default=0)


class Claim(enum.Enum):
    TRIAL = "trial"  # a trial was claimed
    WAIT = "wait"  # the budget is covered by running trials of other workers: wait for them
    DONE = "done"  # the budget is met (or the engine has nothing left to propose)


@dataclass
class Proposal:
    """What an engine asks the next trial to be (``engines.Engine.propose``).

    ``params``: fixed values, enqueued for the trial (a grid point, an oracle's pick), or
    None: the study's sampler picks them.  ``unique``: a grid point, dropped before training
    when another live or finished trial already has it.  ``epochs``: this trial's epochs when
    the engine sets them (KerasTuner's Hyperband); ``tags`` go on the trial's MLflow run,
    ``attrs`` on its Optuna trial; ``token`` is the engine's own handle, handed back to it.
    """

    params: dict[str, Any] | None = None
    unique: bool = False
    epochs: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)
    token: Any = None
