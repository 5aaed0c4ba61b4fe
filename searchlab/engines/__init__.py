"""Search engines: thin adapters that ask a library for the next trial's params.

An engine implements ``Engine`` (below): it proposes each trial and learns its result; the
runner (``searchlab.runner``) does everything else, the same way for every engine: claims a
trial in the Optuna storage, runs it, records it in MLflow and Optuna.  ``create(study,
options)`` returns the engine named in ``options.engine``: ``optuna`` (Optuna's samplers and
pruners) or ``keras-tuner`` (KerasTuner's oracles).  Neither engine imports the other.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from searchlab.errors import StudyDefinitionError
from searchlab.outcome import Claim, Proposal

if TYPE_CHECKING:
    from searchlab.outcome import TrialResult
    from searchlab.store import StudyStore
    from searchlab.study import Study

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
    #: epochs every trial trains before the pruner may stop it (ASHA's and Hyperband's
    #: minimum resource, the median pruner's warm-up); None: 1
    prune_min_epochs: int | None = None
    #: ASHA's and Hyperband's reduction factor: about 1/factor of the trials that reach a rung
    #: go on to the next, rungs at min_epochs * factor**k epochs; None: 3
    prune_factor: int | None = None
    #: after the search, re-train the best ``reeval_top`` configurations ``reeval_seeds`` times
    reeval_top: int = 0
    reeval_seeds: int = 3
    #: fresh models fit per trial, the mean is its value (KerasTuner's executions_per_trial);
    #: None: the study's
    executions_per_trial: int | None = None
    #: set in a worker process of ``searchlab run``: log trials under this parent run
    parent_run_id: str | None = None
    #: the worker's label, e.g. "2/3" (tag ``searchlab.worker`` on its trial runs when the
    #: session has several workers)
    worker: str | None = None
    #: a worker ends itself (exit code ``workers.RECYCLE``, restarted by the launcher) once
    #: its memory grew by this many MB since its first trial; None: never
    recycle_mb: float | None = None
    #: register the session's best model under this name in MLflow's model registry and move
    #: its ``champion`` alias when it is better (``--register``, ``Study(register=...)``)
    register: str | None = None
    #: continue a study whose settings that change results (epochs, data, ...) differ from
    #: this session's; the session run is tagged ``searchlab.changed_settings``
    allow_changed_settings: bool = False
    #: ``--session KEY``: every process given the same key runs one shared session (one
    #: parent run), e.g. the tasks of a SLURM job array; its last process closes it
    session_key: str | None = None

    @property
    def one_of_several(self) -> bool:
        """A worker with siblings (``--workers N``, N > 1): a plain run's one worker is not."""
        return self.worker is not None and not self.worker.endswith("/1")

    def to_json(self) -> str:
        """Every field as one JSON object: ``RunOptions.from_json(o.to_json()) == o``.

        ``storage`` is in it as given: whoever puts the text on a command line replaces a
        URL that may hold a password first (``searchlab run`` hands workers theirs through
        the environment)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunOptions:
        """The options ``to_json`` wrote; ``ValueError`` for anything else (not JSON, not an
        object, a field missing or unknown)."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"RunOptions JSON must be an object, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"RunOptions has no field {', '.join(unknown)}.")
        try:
            return cls(**values)
        except TypeError as exc:  # a field without a default is missing
            raise ValueError(f"RunOptions JSON is incomplete: {exc}.") from None


class SearchListener(Protocol):
    """Progress callbacks (the CLI's ``ConsoleProgress``), called in this order: ``started``
    once (not in a worker, whose launcher says it), then per trial ``trial_started``,
    ``epoch`` after each epoch (after MLflow has it, before a pruner may stop the trial) and
    ``trial_finished``, then ``finished`` once (not in a worker).

    ``epoch`` is numbered from 1 and ``epochs`` is the trial's epoch budget (a two-phase
    ``FineTune`` trial may train more, across its phases)."""

    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None: ...
    def trial_started(
        self, number: int, index: int, total: int | None, params: Mapping[str, Any]
    ) -> None: ...
    def epoch(self, number: int, epoch: int, epochs: int, logs: Mapping[str, float]) -> None: ...
    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None: ...
    def finished(self, summary: Mapping[str, Any]) -> None: ...


class NullListener:
    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None:
        pass

    def trial_started(
        self, number: int, index: int, total: int | None, params: Mapping[str, Any]
    ) -> None:
        pass

    def epoch(self, number: int, epoch: int, epochs: int, logs: Mapping[str, float]) -> None:
        pass

    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None:
        pass

    def finished(self, summary: Mapping[str, Any]) -> None:
        pass


def check_pruning(options: RunOptions) -> None:
    """Refuse a pruner setting that cannot work, with what to pass instead."""
    if options.pruner not in PRUNERS:
        raise StudyDefinitionError(
            f"Unknown pruner {options.pruner!r}: choose one of {', '.join(PRUNERS)}."
        )
    pruner = (
        "hyperband"
        if options.pruner == "none" and options.strategy == "hyperband"
        else options.pruner
    )
    given = [
        flag
        for flag, value in (
            ("--prune-min-epochs", options.prune_min_epochs),
            ("--prune-factor", options.prune_factor),
        )
        if value is not None
    ]
    if given and pruner == "none":
        raise StudyDefinitionError(
            f"{' and '.join(given)} only apply with a pruner, and this run has none: add "
            "--pruner asha (or hyperband, median), or drop the option."
        )
    if options.prune_factor is not None and pruner == "median":
        raise StudyDefinitionError(
            "--prune-factor is the reduction factor of --pruner asha and hyperband; the median "
            "pruner has none. Drop --prune-factor, or use --pruner asha."
        )
    if options.prune_factor is not None and (
        isinstance(options.prune_factor, bool)
        or not isinstance(options.prune_factor, int)
        or options.prune_factor < 2
    ):
        raise StudyDefinitionError(
            f"--prune-factor must be an integer >= 2 (keep about 1/factor of the trials at each "
            f"rung), but got {options.prune_factor!r}. 3 is the default."
        )
    min_epochs = options.prune_min_epochs
    if min_epochs is not None and (
        isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 1
    ):
        raise StudyDefinitionError(
            f"--prune-min-epochs must be an integer >= 1, but got {min_epochs!r}."
        )
    if min_epochs is not None and min_epochs >= options.epochs:
        raise StudyDefinitionError(
            f"--prune-min-epochs must be less than the epochs per trial ({options.epochs}), "
            f"but got {min_epochs}: a trial is never pruned after its last epoch, so nothing "
            "would ever be pruned. Lower --prune-min-epochs, or raise --epochs."
        )


class Engine(Protocol):
    """Proposes each trial's params and learns its results; the runner does the rest.

    Call order, in one process (``runner``):

    1. ``check()`` once, before any store is touched: refuse settings the engine cannot honour.
    2. ``sampler(n_trials)`` once: the Optuna sampler the study is opened with (``n_trials``
       trials are already in the storage); it picks the params a proposal leaves open.
    3. ``open(store)`` once, after the study is opened and before the session's MLflow run
       starts: the engine's own state (an oracle's files) fails here, before anything runs.
    4. Per trial, while the runner holds the study lock: ``propose(store, session)``
       (``session``: the session's MLflow parent run id) returns a
       ``Proposal`` (the runner asks the storage for a trial with it), or ``Claim.DONE``
       (nothing left to propose) / ``Claim.WAIT`` (nothing now; other workers' trials may
       free a point).
    5. Per epoch of that trial whose objective is finite, after the storage has it as the
       trial's intermediate value: ``report(trial, proposal, epoch, logs, last)`` (``last``:
       the trial's final epoch); True stops the trial (pruned).
    6. ``tell(proposal, result)`` exactly once per proposal that became a trial, after MLflow
       and the Optuna storage recorded the result (also when the trial failed or was
       interrupted).
    7. ``close()`` once after a successful ``open``, when the session ends however it ends:
       release what ``open`` holds (the keras-tuner engine's lock on its oracle).

    ``name`` tags every run (``searchlab.engine``); ``info()`` adds the engine's settings to
    the session's parent run (``pruner``, ``pruner_args``).
    """

    name: str

    def check(self) -> None: ...
    def sampler(self, n_trials: int) -> Any: ...
    def info(self) -> dict[str, str]: ...
    def open(self, store: StudyStore) -> None: ...
    def close(self) -> None: ...
    def propose(self, store: StudyStore, session: str) -> Proposal | Claim: ...
    def report(
        self, trial: Any, proposal: Proposal, epoch: int, logs: Mapping[str, float], last: bool
    ) -> bool: ...
    def tell(self, proposal: Proposal, result: TrialResult) -> None: ...


def create(study: Study, options: RunOptions) -> Engine:
    """The engine ``options.engine`` names, for ``study``."""
    check_pruning(options)
    executions = options.executions_per_trial or study.executions_per_trial
    pruned = options.pruner != "none" or options.strategy == "hyperband"
    if executions > 1 and pruned and options.engine == "optuna":
        raise StudyDefinitionError(
            f"{executions} executions per trial are fit to the end and their mean is reported "
            "afterwards, so a pruner cannot stop them early: drop --pruner (and --strategy "
            "hyperband on the Optuna engine), or use one execution per trial."
        )
    if options.engine == "optuna":
        from searchlab.engines.optuna import OptunaEngine

        return OptunaEngine(study, options)
    if options.engine == "keras-tuner":
        from searchlab.engines.kerastuner import KerasTunerEngine

        return KerasTunerEngine(study, options)
    raise StudyDefinitionError(
        f"Unknown engine {options.engine!r}: choose one of {', '.join(ENGINES)}."
    )


def budget(study: Study, options: RunOptions) -> int | None:
    """How many finished trials the study needs: None means until the timeout."""
    if options.strategy == "grid":
        size = study.search_space.grid_size()
        return min(options.trials, size) if options.trials else size
    if options.trials is None and options.timeout is None:
        raise StudyDefinitionError(
            "The study has no budget: set trials= or timeout= in the study, or pass --trials."
        )
    return options.trials


__all__ = [
    "ENGINES",
    "PRUNERS",
    "Claim",
    "Engine",
    "NullListener",
    "Proposal",
    "RunOptions",
    "SearchListener",
    "budget",
    "check_pruning",
    "create",
]
