"""What a trial ends as: its state and its result.  Plain Python, so the stores, the tracker
and the CLI can read a result without importing Keras."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrialState(enum.Enum):
    """How a trial ended (searchlab's view; the stores map it to their own states)."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"


@dataclass
class TrialResult:
    """What one trial produced. ``history`` maps a metric name to its value per epoch."""

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

    @property
    def epochs_run(self) -> int:
        return max((len(v) for v in self.history.values()), default=0)
