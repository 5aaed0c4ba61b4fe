"""Run a study from Python (a notebook, a script): ``searchlab.run(study_or_path, ...)``.

The study runs in the calling process -- a builder defined in the notebook itself (in
``__main__``) is called as it is, nothing is pickled to another process -- through the same
session loop as ``searchlab run`` (``runner.run``): every trial an MLflow run, the feature
cache, the Optuna storage.  Progress is a ``tqdm.auto`` bar (a widget in Jupyter, a text bar
elsewhere).  Ctrl-C (a notebook's interrupt) stops the study with both stores closed: the
session's MLflow run ends KILLED, and the interrupted trial ends FAILED in Optuna and MLflow
(``keep_interrupted=True``: its Optuna trial stays open with its checkpoint, and the next
``run`` goes on with it from its last finished epoch, as ``searchlab run`` does).

Example::

    import searchlab
    result = searchlab.run("studies/mnist_dense.py", trials=3, epochs=1)
    result.best.params, result.best.value
    result.table()          # a pandas DataFrame, best first
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab import config
from searchlab.errors import SearchlabError

if TYPE_CHECKING:
    import pandas as pd

    from searchlab.engines import RunOptions, SearchListener
    from searchlab.outcome import TrialResult
    from searchlab.study import Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestTrial:
    """The best complete trial of a study: its number, params and objective value."""

    number: int
    params: dict[str, Any]
    value: float
    run_id: str | None = None


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the study as run, its stores, the session summary and its best
    trial (None while no trial completed)."""

    study: Study
    storage: str
    tracking_uri: str
    summary: dict[str, Any]
    best: BestTrial | None

    def table(self) -> pd.DataFrame:
        """Every trial of the study as a pandas DataFrame, best first (``searchlab.results``)."""
        from searchlab.report import results

        return results(self.study, storage=self.storage, tracking_uri=self.tracking_uri)


class ProgressBar:
    """A ``SearchListener`` that shows the search as a ``tqdm.auto`` bar: one step per trial,
    the current trial's epoch and the best value so far in its text."""

    def __init__(self, objective: str, *, enabled: bool = True) -> None:
        self.objective = objective
        self.enabled = enabled
        self._bar: Any = None
        self._best: str = ""

    def started(self, name: str, done: int, total: int | None, info: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=done, desc=name, unit="trial")

    def trial_started(
        self, number: int, index: int, total: int | None, params: Mapping[str, Any]
    ) -> None:
        self._show(f"trial #{number}")

    def epoch(self, number: int, epoch: int, epochs: int, logs: Mapping[str, float]) -> None:
        value = logs.get(self.objective)
        shown = f" {self.objective}={value:.4g}" if isinstance(value, float) else ""
        self._show(f"trial #{number} epoch {epoch}/{epochs}{shown}")

    def trial_finished(self, result: TrialResult, best: Mapping[str, Any] | None) -> None:
        if best:
            self._best = f"best {best['value']:.4f} (#{best['number']})"
        if self._bar is not None:
            self._bar.update(1)
        self._show(result.state.value.lower())

    def finished(self, summary: Mapping[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{text}; {self._best}" if self._best else text)


def run(
    study_or_path: Study | str | Path,
    *,
    trials: int | None = None,
    epochs: int | None = None,
    strategy: str | None = None,
    seed: int | None = None,
    timeout: float | None = None,
    engine: str = "optuna",
    pruner: str = "none",
    executions_per_trial: int | None = None,
    max_failures: int = 5,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    keep_interrupted: bool = False,
    listener: SearchListener | None = None,
) -> RunResult:
    """Run (or continue) a study in this process until its budget is met; return its results.

    Args:
        study_or_path: a ``Study`` (e.g. defined in a notebook cell) or a study file's path.
        trials, epochs, strategy, seed, timeout, engine, pruner, executions_per_trial,
            max_failures: as ``searchlab run``'s flags; None: the study's own value.
        storage: the Optuna storage URL (default: ``$SEARCHLAB_STORAGE`` or
            ``sqlite:///.searchlab/optuna.db``).
        tracking_uri: the MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``,
            ``$SEARCHLAB_TRACKING_URI`` or ``sqlite:///.searchlab/mlflow.db``).
        data_dir: where named datasets and weights files are (``--data-dir``).
        progress: show a ``tqdm.auto`` progress bar.
        keep_interrupted: on Ctrl-C, leave the interrupted trial open with its checkpoint
            for the next ``run`` to go on with (default: it ends FAILED, nothing stays open).
        listener: progress callbacks (a ``SearchListener``) instead of the bar.
    """
    from searchlab import engines
    from searchlab.study import Study, check_strategy, load_study

    if data_dir is not None:
        import os

        os.environ[config.DATA_DIR_ENV] = os.path.abspath(data_dir)
    study = study_or_path if isinstance(study_or_path, Study) else load_study(study_or_path)
    if engine not in engines.ENGINES:
        raise SearchlabError(f"engine must be one of {', '.join(engines.ENGINES)}, got {engine!r}.")
    options = engines.RunOptions(
        strategy=check_strategy(strategy or study.strategy),
        trials=trials or study.trials,
        timeout=timeout if timeout is not None else study.timeout,
        epochs=epochs or study.epochs,
        seed=seed if seed is not None else study.seed,
        storage=storage or config.default_storage(),
        data_dir=data_dir,
        engine=engine,
        pruner=pruner,
        max_failures=max_failures,
        executions_per_trial=executions_per_trial,
        register=study.register,
    )
    shown = listener or ProgressBar(study.objective, enabled=progress)
    return run_options(study, options, tracking_uri, shown, keep_interrupted=keep_interrupted)


def tracking_uri_default() -> str:
    """The MLflow tracking URI a run uses when none is given: ``$MLFLOW_TRACKING_URI``, as
    every MLflow tool honours it, else searchlab's own default."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or config.default_tracking_uri()


def run_options(
    study: Study,
    options: RunOptions,
    tracking_uri: str | None,
    listener: SearchListener,
    *,
    keep_interrupted: bool = False,
    artifact_root: Path | None = None,
) -> RunResult:
    """``run`` once the options are set (the KerasTuner drop-in calls this too)."""
    from searchlab import runner
    from searchlab.tracking import MlflowTracker

    uri = tracking_uri or tracking_uri_default()
    tracker = MlflowTracker(uri, artifact_root or config.default_artifact_root())
    try:
        summary = runner.run(study, options, tracker, listener)
    except KeyboardInterrupt:
        if not keep_interrupted:
            close_interrupted(study.name, options.storage)
        raise
    best = None
    if summary.get("best_trial") is not None:
        best = BestTrial(
            number=int(summary["best_trial"]),
            params=dict(summary.get("best_params") or {}),
            value=float(summary["best_value"]),
            run_id=summary.get("best_run_id"),
        )
    return RunResult(study, options.storage, uri, dict(summary), best)


def close_interrupted(name: str, storage: str) -> list[int]:
    """End FAILED the trials of study ``name`` that an interrupt of this process left paused
    (RUNNING in Optuna, their MLflow run already ended KILLED), and remove their checkpoints;
    return their numbers.  This process runs one session at a time and it has returned: any
    trial still RUNNING under this process's id is one it paused."""
    import optuna

    from searchlab import checkpoint, coordination
    from searchlab.interrupts import deferred
    from searchlab.store import StudyStore

    closed: list[int] = []
    with deferred():
        store = StudyStore.load(name, storage)
        running = store.ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in running:
            attrs = trial.user_attrs
            if attrs.get(coordination.HOST_ATTR) != coordination.hostname() or not (
                coordination.is_me(
                    attrs.get(coordination.PID_ATTR), attrs.get(coordination.START_ATTR)
                )
            ):
                continue
            folder = attrs.get(coordination.CHECKPOINT_ATTR)
            store.storage.set_trial_user_attr(
                trial._trial_id, coordination.ERROR_ATTR, "interrupted (Ctrl-C)"
            )
            store.storage.set_trial_state_values(
                trial._trial_id, state=optuna.trial.TrialState.FAIL
            )
            checkpoint.remove(Path(folder) if folder else None)
            closed.append(trial.number)
    if closed:
        log.warning("interrupted: trial %s ended FAILED", ", ".join(map(str, closed)))
    return closed


__all__ = ["BestTrial", "ProgressBar", "RunResult", "run"]
