"""The keras-tuner engine: KerasTuner's oracles pick the params, searchlab runs the trials.

Strategies map to oracles: ``random`` -> ``RandomSearchOracle``, ``bayesian`` and ``gp`` ->
``BayesianOptimizationOracle`` (a Gaussian process), ``hyperband`` ->
``HyperbandOracle(max_epochs=epochs, factor=3)``, whose trials train for the epochs the oracle
assigns (``tuner/epochs``), from scratch: keras-tuner's Tuner would continue an earlier
round's checkpoint, which we do not keep.  ``grid`` is searchlab's own grid
(``engines.grid``), as on the Optuna engine: KerasTuner's ``GridSearchOracle`` keeps its
order in memory only and cannot continue a study after a reload (KerasTuner #1055).

Why oracles and not a ``Tuner``: a Tuner owns the fit loop, its checkpoints and its
TensorBoard hook, which imports ``tensorboard`` in every trial (the TensorFlow CPU wheel does
not install it, so every trial fails).  Here the oracle only proposes (``Engine.propose``)
and learns (``report`` feeds it each epoch, ``tell`` ends its trial); the runner runs every
trial exactly as on the optuna engine, so tensorboard is never imported and the MLflow runs
are the same.

State: the oracle keeps its own files (``oracle.json``, ``trial_*/trial.json``) under
``<home>/kerastuner/<study>/``, each written whole or not at all (a temporary file renamed
over it), and reloads them when the study runs again.  Every trial is also recorded in the
same Optuna storage as on the optuna engine (the oracle's params enqueued, then told the
result, with the MLflow run id as user attr ``mlflow_run_id`` and the oracle's trial id as
``kerastuner_trial_id``), so the budget, resume, ``export``, reports and re-evaluation read
one store whichever engine ran the study.  After a crash the two agree again when the
oracle is opened: a trial the oracle still holds as running is ended there with the result
the Optuna storage has for it (killed after the stores recorded it), or proposed again
(killed while it trained).

One process at a time: the oracle lives in the process that opened it, so a second session
on the same study (another ``searchlab run --engine keras-tuner``) is refused while the first
runs (a lock on the folder, released when that process ends however it ends).  Several
workers on one study: ``--engine optuna``.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import keras_tuner as kt

from searchlab import config
from searchlab.coordination import key
from searchlab.engines.grid import grid_points, propose_grid
from searchlab.errors import StoreError, StudyDefinitionError
from searchlab.outcome import Claim, Proposal, TrialResult, TrialState
from searchlab.space import Bool, Choice, Float, Int, hp_value

if TYPE_CHECKING:
    from searchlab.engines import RunOptions
    from searchlab.store import StudyStore
    from searchlab.study import Study

log = logging.getLogger(__name__)
ENGINE = "keras-tuner"
TUNER_ID = "searchlab"
KT_TRIAL_ATTR = "kerastuner_trial_id"
KT_HYPERBAND_FACTOR = 3  # HyperbandOracle: about 1/3 of the trials go on at each round
ORACLE_FILE = "oracle.json"
TRIAL_FILE = "trial.json"
LOCK_FILE = ".lock"


def state_dir(study_name: str) -> Path:
    """Where the oracle of ``study_name`` keeps its files."""
    return config.home() / "kerastuner" / re.sub(r"[^\w.-]", "_", study_name)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` whole or not at all: a process killed meanwhile
    leaves the previous file (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(value, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic(oracle_class: type, folder: Path) -> type:
    """``oracle_class`` whose state files in ``folder`` are written by ``write_json``.

    KerasTuner writes ``oracle.json`` (``Oracle.save``) and each ``trial.json``
    (``Oracle._save_trial``, private: the one place we override one) in place, so a kill
    mid-write left a file that no later run could read.  ``test_engines_kerastuner`` fails
    when KerasTuner stops calling either."""

    class AtomicOracle(oracle_class):
        def save(self) -> None:
            write_json(folder / ORACLE_FILE, self.get_state())

        def _save_trial(self, trial: Any) -> None:
            write_json(folder / f"trial_{trial.trial_id}" / TRIAL_FILE, trial.get_state())

    AtomicOracle.__name__ = AtomicOracle.__qualname__ = oracle_class.__name__
    return AtomicOracle


def _overrides(study: Study) -> dict[str, Any]:
    """The study's ``hyperparameters=`` / ``tune_new_entries=`` / ``allow_new_entries=`` as
    the oracle's own arguments (KerasTuner applies them itself)."""
    rules = getattr(study.search_space, "overrides", None)
    if rules is None or not rules.active:
        return {}
    hp = kt.HyperParameters()
    for name, value in rules.params.items():
        if isinstance(value, Int | Float | Choice | Bool):
            hp_value(hp, name, value, grid=False)
        else:
            hp.Fixed(name, value)
    return {
        "hyperparameters": hp,
        "tune_new_entries": rules.tune_new_entries,
        "allow_new_entries": rules.allow_new_entries,
    }


ORACLES = {
    "random": kt.oracles.RandomSearchOracle,
    "bayesian": kt.oracles.BayesianOptimizationOracle,
    "gp": kt.oracles.BayesianOptimizationOracle,
    "hyperband": kt.oracles.HyperbandOracle,
}


def make_oracle(study: Study, options: RunOptions, folder: Path | None = None) -> Any:
    """The oracle of ``options.strategy`` (not ``grid``: see the module doc); with
    ``folder``, one that keeps its state there."""
    strategy = options.strategy
    if strategy not in ORACLES:
        raise StudyDefinitionError(
            f"Unknown strategy {strategy!r} for the keras-tuner engine: choose one of "
            f"grid, {', '.join(ORACLES)}."
        )
    objective = kt.Objective(study.objective, "max" if study.goal == "maximize" else "min")
    common: dict[str, Any] = {
        "objective": objective,
        "seed": options.seed + 1,  # keras-tuner treats seed 0 as "pick one at random"
        "max_consecutive_failed_trials": 10**9,  # --max-failures decides, not the oracle
        **_overrides(study),
        # our budget (finished trials in the Optuna storage) decides when to stop
        "max_trials": None,
    }
    if strategy == "hyperband":
        del common["max_trials"]
        common.update(
            max_epochs=options.epochs, factor=KT_HYPERBAND_FACTOR, hyperband_iterations=None
        )
    cls = ORACLES[strategy] if folder is None else _atomic(ORACLES[strategy], folder)
    oracle = cls(**common)
    oracle.verbose = 0  # the CLI prints progress
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        oracle._set_project_dir(str(folder.parent), folder.name)
    return oracle


def open_oracle(study: Study, options: RunOptions, store: StudyStore) -> Any:
    """The study's oracle: reloaded from its folder if it ran before (and made to agree with
    the Optuna storage), else a new one."""
    folder = state_dir(study.name)
    oracle = make_oracle(study, options, folder)
    if (folder / ORACLE_FILE).is_file():
        _reload(oracle, folder)
    _populate_space(oracle, study.search_space, grid=False)
    if (folder / ORACLE_FILE).is_file():
        _agree_with(oracle, store, study.objective)
    return oracle


def _reload(oracle: Any, folder: Path) -> None:
    """Load the oracle's state and its trials (public ``set_state``/``Trial.from_state``:
    KerasTuner's own ``reload`` would also put the trial that was running in a retry queue,
    and read every trial file, even one the state never knew)."""
    try:
        state = _read_json(folder / ORACLE_FILE)
        oracle.trials = {
            trial_id: kt.engine.trial.Trial.from_state(
                _read_json(folder / f"trial_{trial_id}" / TRIAL_FILE)
            )
            for trial_id in state["start_order"]
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"keras-tuner's state in {folder} cannot be read ({type(exc).__name__}: {exc}): "
            "it is damaged (an older searchlab wrote it in place and was killed meanwhile). "
            "Delete that folder to "
            "start the oracle afresh; finished trials stay in the Optuna storage."
        ) from exc
    try:
        oracle.set_state(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise StudyDefinitionError(
            f"keras-tuner's state in {folder} belongs to another --strategy (it lacks "
            f"{exc}): run with the strategy the study ran with, or give the study a new name."
        ) from exc


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _agree_with(oracle: Any, store: StudyStore, objective: str) -> None:
    """End in the oracle each trial it still holds as running that the Optuna storage has
    finished (the process was killed after the stores recorded the result, before the
    oracle did): it is not run twice.  A trial the storage has not finished (killed while it
    trained) stays the oracle's running trial, which ``create_trial`` proposes again."""
    finished = {
        (t.attrs.get(KT_TRIAL_ATTR), key(t.params)): t
        for t in store.trials(TrialState.COMPLETE, TrialState.PRUNED)
        if t.attrs.get(KT_TRIAL_ATTR) is not None
    }
    for ktrial in list(oracle.ongoing_trials.values()):
        done = finished.get((ktrial.trial_id, key(active_values(ktrial.hyperparameters))))
        if done is None:
            continue
        log.info("keras-tuner trial %s finished as Optuna trial %s", ktrial.trial_id, done.number)
        if done.value is not None:
            oracle.update_trial(ktrial.trial_id, {objective: done.value}, step=0)
        result = TrialResult(done.number, dict(done.params), done.state, value=done.value)
        _end_kt(oracle, ktrial, result)


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
        self.grid: list[dict[str, Any]] | None = None
        self._lock: IO[str] | None = None

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
        if options.strategy == "grid":
            self.grid = grid_points(self.study)  # refuses continuous params without grid values
        else:
            make_oracle(self.study, options)  # an unknown strategy fails before any store write

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
        if self.grid is not None:
            return  # the grid's state is the Optuna storage: nothing of its own to open
        self._lock = _hold(state_dir(self.study.name))
        try:
            self.oracle = open_oracle(self.study, self.options, store)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def propose(self, store: StudyStore, session: str) -> Proposal | Claim:
        if self.grid is not None:
            return propose_grid(store, self.grid, session)
        ktrial = self.oracle.create_trial(TUNER_ID)
        if ktrial.status != kt.engine.trial.TrialStatus.RUNNING:
            log.info("keras-tuner's oracle has no more trials (%s)", ktrial.status)
            return Claim.DONE
        hp = ktrial.hyperparameters
        # Declares what the oracle has not seen yet (conditional branches, build_model loops)
        # with its default, as keras-tuner's Tuner does; the oracle learns it at the end.
        params = self.study.search_space.to_hp(hp, grid=False)
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
        if proposal.token is not None:  # an oracle's trial (not a grid point)
            finite = {k: v for k, v in logs.items() if math.isfinite(v)}
            self.oracle.update_trial(proposal.token.trial_id, finite, step=epoch)
        return False  # Hyperband's rounds set each trial's epochs instead

    def tell(self, proposal: Proposal, result: TrialResult) -> None:
        if proposal.token is not None:
            _end_kt(self.oracle, proposal.token, result)


def _hold(folder: Path) -> IO[str]:
    """An exclusive lock on the oracle's folder for this session (see the module doc)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held for the session
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(
            f"Another searchlab run is using this study's keras-tuner oracle ({folder}): the "
            "keras-tuner engine runs one process per study. Wait for it to end, or use "
            "--engine optuna to run several processes (--workers N) on one study."
        ) from None
    return handle


__all__ = [
    "ENGINE",
    "KerasTunerEngine",
    "make_oracle",
    "open_oracle",
    "state_dir",
    "write_json",
]
