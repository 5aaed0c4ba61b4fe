"""Search engines: thin adapters that ask a library for params and drive ``trial.run_trial``.

``run(study, options, tracker, listener)`` picks the engine named in ``options.engine``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from searchlab.errors import StudyDefinitionError

if TYPE_CHECKING:
    from searchlab.study import Study
    from searchlab.tracking import Tracker
    from searchlab.trial import TrialResult

ENGINES = ("optuna", "keras-tuner")
PRUNERS = ("none", "median", "asha", "hyperband")


@dataclass(frozen=True)
class RunOptions:
    """How one ``searchlab run`` session runs a study (CLI flags over the study's defaults)."""

    strategy: str
    trials: int | None
    timeout: float | None
    epochs: int
    seed: int
    storage: str
    data_dir: str | None = None
    engine: str = "optuna"
    max_failures: int = 5
    precision: str = "float32"  # a Keras dtype policy: float32, mixed_float16, mixed_bfloat16
    #: Optuna pruner: none, median, asha or hyperband (strategy hyperband implies hyperband)
    pruner: str = "none"
    #: after the search, re-train the best ``reeval_top`` configurations ``reeval_seeds`` times
    reeval_top: int = 0
    reeval_seeds: int = 3
    #: set in a worker process of ``searchlab run``: log trials under this parent run
    parent_run_id: str | None = None
    #: the worker's label, e.g. "2/3" (tag ``searchlab.worker`` on its trial runs when the
    #: session has several workers)
    worker: str | None = None
    #: a worker ends itself (exit code ``workers.RECYCLE``, restarted by the launcher) once
    #: its memory grew by this many MB since its first trial; None: never
    recycle_mb: float | None = None

    @property
    def one_of_several(self) -> bool:
        """A worker with siblings (``--workers N``, N > 1): a plain run's one worker is not."""
        return self.worker is not None and not self.worker.endswith("/1")


class SearchListener(Protocol):
    """Progress callbacks, called in this order: ``started`` once, then per trial
    ``trial_started`` and ``trial_finished``, then ``finished`` once."""

    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None: ...
    def trial_started(self, number: int, index: int, total: int | None, params: Mapping[str, Any]) -> None: ...
    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None: ...
    def finished(self, summary: Mapping[str, Any]) -> None: ...


class NullListener:
    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None:
        pass

    def trial_started(self, number: int, index: int, total: int | None, params: Mapping[str, Any]) -> None:
        pass

    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None:
        pass

    def finished(self, summary: Mapping[str, Any]) -> None:
        pass


def run(
    study: Study,
    options: RunOptions,
    tracker: Tracker,
    listener: SearchListener | None = None,
) -> dict[str, Any]:
    """Run (or continue) ``study`` until its budget is met; return the session summary."""
    if options.pruner not in PRUNERS:
        raise StudyDefinitionError(
            f"Unknown pruner {options.pruner!r}: choose one of {', '.join(PRUNERS)}."
        )
    if options.engine == "optuna":
        from searchlab.engines import optuna as engine
    elif options.engine == "keras-tuner":
        from searchlab.engines import kerastuner as engine
    else:
        raise StudyDefinitionError(
            f"Unknown engine {options.engine!r}: choose one of {', '.join(ENGINES)}."
        )
    return engine.run(study, options, tracker, listener or NullListener())
