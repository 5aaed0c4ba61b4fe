"""The keras-tuner engine: KerasTuner's oracles pick the params, searchlab runs the trials.

Strategies map to oracles: ``grid`` -> ``GridSearchOracle``, ``random`` ->
``RandomSearchOracle``, ``bayesian`` and ``gp`` -> ``BayesianOptimizationOracle`` (a
Gaussian process), ``hyperband`` -> ``HyperbandOracle(max_epochs=epochs, factor=3)``, whose
trials train for the epochs the oracle assigns (``tuner/epochs``), from scratch: keras-tuner's
Tuner would continue an earlier round's checkpoint, which we do not keep.

Why oracles and not a ``Tuner``: a Tuner owns the fit loop, its checkpoints and its
TensorBoard hook, which imports ``tensorboard`` in every trial (the TensorFlow CPU wheel does
not install it, so every trial fails).  Here every trial runs through ``trial.run_trial``
exactly as on the optuna engine, so tensorboard is never imported and the MLflow runs are the
same.

State: the oracle keeps its own files (``oracle.json``, ``trial_*/trial.json``) under
``<home>/kerastuner/<study>/``; it reloads them when the study runs again, and a trial that
was running when the process died is proposed again.  Every trial is also recorded in the
same Optuna storage as on the optuna engine (its params enqueued, then told the result, with
the MLflow run id as user attr ``mlflow_run_id``), so the budget, resume, ``export``,
reports and re-evaluation read one store whichever engine ran the study.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras_tuner as kt
import optuna

from searchlab import config
from searchlab.engines.optuna import (
    FINISHED,
    RUN_ID_ATTR,
    _best,
    _finish,
    _log_study_artifacts,
    _summary,
    budget,
    failure_streak,
    link_session,
    load_optuna_study,
    open_storage,
    session_info,
    trial_spec,
    trial_tags,
)
from searchlab.errors import StudyDefinitionError

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker
    from searchlab.trial import TrialResult, TrialSpec

log = logging.getLogger(__name__)
ENGINE = "keras-tuner"
TUNER_ID = "searchlab"
KT_TRIAL_ATTR = "kerastuner_trial_id"
KT_HYPERBAND_FACTOR = 3  # HyperbandOracle: about 1/3 of the trials go on at each round


def state_dir(study_name: str) -> Path:
    """Where the oracle of ``study_name`` keeps its files."""
    return config.home() / "kerastuner" / re.sub(r"[^\w.-]", "_", study_name)


def make_oracle(study: Study, options: RunOptions) -> Any:
    objective = kt.Objective(study.objective, "max" if study.direction == "maximize" else "min")
    common = {
        "objective": objective,
        "seed": options.seed + 1,  # keras-tuner treats seed 0 as "pick one at random"
        "max_consecutive_failed_trials": 10**9,  # --max-failures decides, not the oracle
    }
    strategy = options.strategy
    # max_trials=None: our budget (finished trials in the Optuna storage) decides when to stop
    if strategy == "grid":
        oracle = kt.oracles.GridSearchOracle(max_trials=None, **common)
    elif strategy == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=None, **common)
    elif strategy in ("bayesian", "gp"):
        oracle = kt.oracles.BayesianOptimizationOracle(max_trials=None, **common)
    elif strategy == "hyperband":
        oracle = kt.oracles.HyperbandOracle(
            max_epochs=options.epochs, factor=KT_HYPERBAND_FACTOR, hyperband_iterations=None,
            **common
        )
    else:
        raise StudyDefinitionError(f"Unknown strategy {strategy!r} for the keras-tuner engine.")
    oracle.verbose = 0  # the CLI prints progress
    return oracle


def open_oracle(study: Study, options: RunOptions, space: Any) -> Any:
    """The study's oracle: reloaded from its folder if it ran before, else a new one."""
    oracle = make_oracle(study, options)
    grid = options.strategy == "grid"
    folder = state_dir(study.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    oracle._set_project_dir(str(folder.parent), folder.name)
    if (folder / "oracle.json").is_file():
        try:
            oracle.reload()
        except Exception as exc:
            raise StudyDefinitionError(
                f"Cannot reload keras-tuner's state in {folder} ({type(exc).__name__}: {exc}). "
                "It was written by another strategy or space: run with the same --strategy, "
                "or give the study a new name."
            ) from exc
    _populate_space(oracle, space, grid)
    return oracle


def _populate_space(oracle: Any, space: Any, grid: bool) -> None:
    """Declare the whole space on the oracle, activating every conditional scope once
    (what keras-tuner's ``BaseTuner._activate_all_conditions`` does)."""
    never_active: list[Any] = []
    once_active: list[Any] = []
    hp = oracle.get_space()
    while True:
        space.to_hp(hp, grid=grid)
        oracle.update_space(hp)
        for conditions in hp.active_scopes:
            if conditions not in once_active:
                once_active.append(copy.deepcopy(conditions))
            if conditions in never_active:
                never_active.remove(conditions)
        for conditions in hp.inactive_scopes:
            if conditions not in once_active and conditions not in never_active:
                never_active.append(copy.deepcopy(conditions))
        if not never_active:
            return
        hp = oracle.get_space()
        for condition in never_active.pop(0):
            hp.values[condition.name] = condition.values[0]
        hp.ensure_active_values()


def active_values(hp: Any) -> dict[str, Any]:
    """The active, non-bookkeeping values of a keras-tuner trial's ``HyperParameters``."""
    return {
        p.name: hp.values[p.name]
        for p in hp.space
        if not p.name.startswith("tuner/") and p.name in hp.values and hp.is_active(p)
    }


def run(
    study: Study,
    options: RunOptions,
    tracker: MlflowTracker,
    listener: SearchListener,
) -> dict[str, Any]:
    """Run or continue ``study`` with keras-tuner's oracle; see the module docstring."""
    if options.pruner != "none":
        raise StudyDefinitionError(
            f"--pruner {options.pruner} is an Optuna pruner; the keras-tuner engine stops "
            "trials early only with --strategy hyperband. Drop --pruner, or use --engine optuna."
        )
    if options.prune_min_epochs is not None or options.prune_factor is not None:
        raise StudyDefinitionError(
            "--prune-min-epochs and --prune-factor set Optuna's pruners; the keras-tuner "
            f"engine's Hyperband oracle uses factor {KT_HYPERBAND_FACTOR} and --epochs. Drop "
            "them, or use --engine optuna."
        )
    space = study.search_space
    target = budget(study, options)
    if options.strategy == "grid":
        space.grid()  # refuses continuous parameters without grid values, before anything runs
    spec = trial_spec(study, options)  # a missing dataset fails before the stores are touched
    storage = open_storage(options.storage)
    tracker.connect()
    ostudy = load_optuna_study(study, storage, optuna.samplers.RandomSampler(seed=options.seed))
    oracle = open_oracle(study, options, space)

    hyperband = options.strategy == "hyperband"
    pruner = "HyperbandOracle" if hyperband else "none"
    info = session_info(study, options, target, ENGINE, pruner, spec.data.source,
                        pruner_args=f"factor={KT_HYPERBAND_FACTOR}" if hyperband else "")
    tracker.start_study(study.name, info)
    link_session(tracker, study, ostudy, len(ostudy.get_trials(deepcopy=False, states=FINISHED)))
    base_tags = trial_tags(study, options, ENGINE)
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    started = time.monotonic()
    consecutive_failures = 0
    status = "FAILED"

    def finished_count() -> int:
        return len(ostudy.get_trials(deepcopy=False, states=FINISHED))

    listener.started(study.name, finished_count(), target, info)
    try:
        with tempfile.TemporaryDirectory(prefix="searchlab-trial-") as tmp:
            while True:
                done = finished_count()
                if target is not None and done >= target:
                    break
                if options.timeout is not None and time.monotonic() - started >= options.timeout:
                    log.info("time budget of %ss reached", options.timeout)
                    break
                ktrial = oracle.create_trial(TUNER_ID)
                if ktrial.status != kt.engine.trial.TrialStatus.RUNNING:
                    log.info("keras-tuner's oracle has no more trials (%s)", ktrial.status)
                    break
                result = _one_trial(
                    ostudy, oracle, ktrial, space, spec, tracker, listener, base_tags,
                    Path(tmp), done, target,
                )
                counts[result.state.value] += 1
                consecutive_failures = failure_streak(
                    consecutive_failures, result, options.max_failures
                )
            if options.reeval_top:
                from searchlab import reeval

                reeval.reevaluate(
                    ostudy, spec, tracker, base_tags, options.reeval_top, options.reeval_seeds,
                    Path(tmp) / "reeval",
                )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary = _summary(ostudy, counts, started)
        try:
            if status == "FINISHED":
                _log_study_artifacts(study, ostudy, spec, tracker, summary)
        finally:
            tracker.end_study(summary, status)
        listener.finished(summary)
    return summary


def _one_trial(
    ostudy: optuna.Study,
    oracle: Any,
    ktrial: Any,
    space: Any,
    spec: TrialSpec,
    tracker: MlflowTracker,
    listener: SearchListener,
    base_tags: Mapping[str, str],
    tmp: Path,
    done: int,
    target: int | None,
) -> TrialResult:
    import dataclasses

    from searchlab.trial import TrialResult, TrialState, run_trial

    hp = ktrial.hyperparameters
    # Declares what the oracle has not seen yet (conditional branches, build_model loops) with
    # its default, as keras-tuner's Tuner does; the oracle learns it when the trial ends.
    proposed = space.to_hp(hp, grid=oracle.__class__.__name__ == "GridSearchOracle")
    ostudy.enqueue_trial(proposed, skip_if_exists=False)
    otrial = ostudy.ask()
    params = space.suggest(otrial)  # the enqueued values, with their Optuna distributions
    if params != proposed:
        log.warning("Optuna stored %s for keras-tuner's %s", params, proposed)
    number = otrial.number
    trial_spec = spec
    tags = {
        **base_tags,
        "searchlab.input_shape": ",".join(map(str, spec.data.input_shape)),
        "searchlab.num_classes": str(spec.data.num_classes),
        "searchlab.kt.trial_id": str(ktrial.trial_id),
    }
    if "tuner/epochs" in hp.values:  # Hyperband: this round's epochs
        trial_spec = dataclasses.replace(spec, epochs=int(hp.values["tuner/epochs"]))
        for key in ("tuner/epochs", "tuner/bracket", "tuner/round", "tuner/trial_id"):
            if key in hp.values:
                tags[f"searchlab.kt.{key.split('/', 1)[1]}"] = str(hp.values[key])
    listener.trial_started(number, done + 1, target, params)
    run_id = tracker.start_trial(number, params, tags)
    otrial.set_user_attr(RUN_ID_ATTR, run_id)
    otrial.set_user_attr(KT_TRIAL_ATTR, str(ktrial.trial_id))

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        tracker.log_epoch(run_id, epoch, logs)
        value = logs.get(spec.objective)
        if value is not None and math.isfinite(value):
            otrial.report(value, epoch + 1)
            finite = {k: v for k, v in logs.items() if math.isfinite(v)}
            oracle.update_trial(ktrial.trial_id, finite, step=epoch)

    try:
        result = run_trial(number, params, trial_spec, tmp / f"trial-{number}", on_epoch)
    except BaseException as exc:  # Ctrl-C or a study-level error: close this trial, then stop
        error = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
        result = TrialResult(number, params, TrialState.FAILED, error=error)
        _finish(ostudy, otrial, tracker, run_id, result)
        _end_kt(oracle, ktrial, result)
        raise
    _finish(ostudy, otrial, tracker, run_id, result)
    _end_kt(oracle, ktrial, result)
    best = _best(ostudy)
    listener.trial_finished(
        result,
        {"number": best.number, "value": best.value, "params": best.params} if best else None,
    )
    return result


def _end_kt(oracle: Any, ktrial: Any, result: TrialResult) -> None:
    status = kt.engine.trial.TrialStatus
    if result.state.value == "failed" or not ktrial.metrics.exists(oracle.objective.name):
        ktrial.status = status.FAILED
        ktrial.message = (result.error or "failed")[:2000]
    else:
        ktrial.status = status.COMPLETED
    oracle.end_trial(ktrial)
    # end_trial saves before it drops the trial from ongoing_trials; without this save a
    # reload would put the finished trial in the retry queue and run it again
    oracle.save()


__all__ = ["ENGINE", "make_oracle", "open_oracle", "run", "state_dir"]
