"""The keras-tuner engine: KerasTuner's oracles pick the params, searchlab runs the trials.

Strategies map to oracles: ``grid`` -> ``GridSearchOracle``, ``random`` ->
``RandomSearchOracle``, ``bayesian`` and ``gp`` -> ``BayesianOptimizationOracle`` (a
Gaussian process), ``hyperband`` -> ``HyperbandOracle(max_epochs=epochs, factor=3)``, whose
trials train for the epochs the oracle assigns (``tuner/epochs``), from scratch: keras-tuner's
Tuner would continue an earlier round's checkpoint, which we do not keep.

Why oracles and not a ``Tuner``: a Tuner owns the fit loop, its checkpoints and its
TensorBoard hook, which imports ``tensorboard`` in every trial (the TensorFlow CPU wheel does
not install it, so every trial fails).  Here the oracle only proposes (``Engine.propose``)
and learns (``should_prune`` feeds it each epoch, ``tell`` ends its trial); the runner runs
every trial exactly as on the optuna engine, so tensorboard is never imported and the MLflow
runs are the same.

State: the oracle keeps its own files (``oracle.json``, ``trial_*/trial.json``) under
``<home>/kerastuner/<study>/``; it reloads them when the study runs again, and a trial that
was running when the process died is proposed again.  Every trial is also recorded in the
same Optuna storage as on the optuna engine (the oracle's params enqueued, then told the
result, with the MLflow run id as user attr ``mlflow_run_id``), so the budget, resume,
``export``, reports and re-evaluation read one store whichever engine ran the study.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras_tuner as kt

from searchlab import config
from searchlab.errors import StudyDefinitionError
from searchlab.outcome import Claim, Proposal, TrialState

if TYPE_CHECKING:
    from searchlab.engines import RunOptions
    from searchlab.outcome import TrialResult
    from searchlab.store import StudyStore
    from searchlab.study import Study

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
            max_epochs=options.epochs,
            factor=KT_HYPERBAND_FACTOR,
            hyperband_iterations=None,
            **common,
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


def _end_kt(oracle: Any, ktrial: Any, result: TrialResult) -> None:
    status = kt.engine.trial.TrialStatus
    if result.state is TrialState.FAILED or not ktrial.metrics.exists(oracle.objective.name):
        ktrial.status = status.FAILED
        ktrial.message = (result.error or "failed")[:2000]
    else:
        ktrial.status = status.COMPLETED
    oracle.end_trial(ktrial)
    # end_trial saves before it drops the trial from ongoing_trials; without this save a
    # reload would put the finished trial in the retry queue and run it again
    oracle.save()


class KerasTunerEngine:
    """The ``Engine`` of KerasTuner's oracles (call order: ``engines.Engine``)."""

    name = ENGINE

    def __init__(self, study: Study, options: RunOptions) -> None:
        self.study = study
        self.options = options
        self.oracle: Any = None

    def check(self) -> None:
        options = self.options
        if options.pruner != "none":
            raise StudyDefinitionError(
                f"--pruner {options.pruner} is an Optuna pruner; the keras-tuner engine stops "
                "trials early only with --strategy hyperband. Drop --pruner, or use --engine "
                "optuna."
            )
        if options.prune_min_epochs is not None or options.prune_factor is not None:
            raise StudyDefinitionError(
                "--prune-min-epochs and --prune-factor set Optuna's pruners; the keras-tuner "
                f"engine's Hyperband oracle uses factor {KT_HYPERBAND_FACTOR} and --epochs. "
                "Drop them, or use --engine optuna."
            )
        make_oracle(self.study, options)  # an unknown strategy fails before any store write
        if options.strategy == "grid":
            self.study.search_space.grid()  # refuses continuous params without grid values

    def sampler(self, n_trials: int) -> Any:
        import optuna

        # It only records the oracle's values (enqueued): nothing is sampled.
        return optuna.samplers.RandomSampler(seed=self.options.seed)

    def info(self) -> dict[str, str]:
        if self.options.strategy == "hyperband":
            # named as --pruner names it; the oracle is keras-tuner's HyperbandOracle
            return {"pruner": "hyperband", "pruner_args": f"factor={KT_HYPERBAND_FACTOR}"}
        return {"pruner": "none"}

    def open(self, store: StudyStore) -> None:
        self.oracle = open_oracle(self.study, self.options, self.study.search_space)

    def propose(self, store: StudyStore, session: str) -> Proposal | Claim:
        ktrial = self.oracle.create_trial(TUNER_ID)
        if ktrial.status != kt.engine.trial.TrialStatus.RUNNING:
            log.info("keras-tuner's oracle has no more trials (%s)", ktrial.status)
            return Claim.DONE
        hp = ktrial.hyperparameters
        # Declares what the oracle has not seen yet (conditional branches, build_model loops)
        # with its default, as keras-tuner's Tuner does; the oracle learns it at the end.
        grid = self.options.strategy == "grid"
        params = self.study.search_space.to_hp(hp, grid=grid)
        proposal = Proposal(
            params=params,
            tags={"searchlab.kt.trial_id": str(ktrial.trial_id)},
            attrs={KT_TRIAL_ATTR: str(ktrial.trial_id)},
            token=ktrial,
        )
        if "tuner/epochs" in hp.values:  # Hyperband: this round's epochs
            proposal.epochs = int(hp.values["tuner/epochs"])
            for name in ("tuner/epochs", "tuner/bracket", "tuner/round", "tuner/trial_id"):
                if name in hp.values:
                    proposal.tags[f"searchlab.kt.{name.split('/', 1)[1]}"] = str(hp.values[name])
        return proposal

    def report(
        self, trial: Any, proposal: Proposal, epoch: int, logs: Mapping[str, float], last: bool
    ) -> bool:
        finite = {k: v for k, v in logs.items() if math.isfinite(v)}
        self.oracle.update_trial(proposal.token.trial_id, finite, step=epoch)
        return False  # Hyperband's rounds set each trial's epochs instead

    def tell(self, proposal: Proposal, result: TrialResult) -> None:
        _end_kt(self.oracle, proposal.token, result)


__all__ = ["ENGINE", "KerasTunerEngine", "make_oracle", "open_oracle", "state_dir"]
