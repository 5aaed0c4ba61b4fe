"""The Optuna engine: Optuna's samplers pick the params, its pruners stop bad trials early.

Strategies map to samplers: ``random`` (and ``hyperband``) -> ``RandomSampler``, ``bayesian``
-> ``TPESampler``, ``gp`` -> ``GPSampler``, ``grid`` -> the study's grid points, proposed in
order (``engines.grid``) to a ``RandomSampler`` that only records them.  ``--pruner`` picks a
pruner (``make_pruner``) that ``should_prune`` asks after each epoch.

The study itself (storage, budget, resume, several workers) is the runner's and the store's;
see ``searchlab.runner``.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna

from searchlab.coordination import FINISHED, hostname, key
from searchlab.engines.grid import grid_points, propose_grid
from searchlab.errors import StudyDefinitionError
from searchlab.outcome import Claim, Proposal

if TYPE_CHECKING:
    from searchlab.engines import RunOptions
    from searchlab.outcome import TrialResult
    from searchlab.store import StudyStore
    from searchlab.study import Study

log = logging.getLogger(__name__)
ENGINE = "optuna"


def make_sampler(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    if strategy in ("random", "grid", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "bayesian":
        # Optuna 5's TPE defaults are the ones we want: multivariate (params sampled jointly,
        # single objective) and constant_liar (--workers do not all propose the same point).
        # Pruned trials count as finished, also towards the 5 random start-up trials; TPE
        # ranks them below every complete trial (docs/search.md, "Pruning").  5, not Optuna's 10:
        # studies here run tens of trials, not hundreds.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if strategy == "gp":
        try:
            import torch  # noqa: F401 - GPSampler needs it
        except ImportError:
            raise StudyDefinitionError(
                "Strategy 'gp' uses Optuna's GPSampler, which needs PyTorch: "
                "pip install 'searchlab[gp]' (or torch), or use --strategy bayesian."
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    raise StudyDefinitionError(f"Unknown strategy {strategy!r}.")


#: ``--pruner asha``/``hyperband`` defaults.  A trial may be stopped after its first epoch
#: (the earliest signal there is: a study that needs warm-up epochs says so with
#: ``--prune-min-epochs``) and about a third of the trials that reach a rung go on (rungs at
#: 1, 3, 9, 27 ... epochs; Optuna's own default of 4 keeps a quarter and, at 4 epochs or
#: fewer, leaves a single rung).  Not Optuna's ``bootstrap_count``: it prunes the first trials
#: that reach a rung outright, which in a sequential run throws away the first trials.
PRUNE_MIN_EPOCHS = 1
PRUNE_FACTOR = 3

#: draws random search makes for a configuration no trial of the study has before it runs
#: one again (KerasTuner's ``max_collisions``): a small discrete space repeats otherwise
MAX_COLLISIONS = 20


def pruner_name(options: RunOptions) -> str:
    """The session's pruner as ``--pruner`` names it: strategy ``hyperband`` without a pruner
    named means ``hyperband``."""
    if options.pruner == "none" and options.strategy == "hyperband":
        return "hyperband"
    return options.pruner


def make_pruner(options: RunOptions) -> optuna.pruners.BasePruner:
    """``--pruner``: none (never prune), median, asha (successive halving) or hyperband.

    Steps are epochs trained (1, 2, ...).  Strategy ``hyperband`` means random sampling with
    the Hyperband pruner unless another pruner is named.  ``--prune-min-epochs`` and
    ``--prune-factor`` (checked by ``engines.check_pruning``) override the defaults above.
    """
    name = pruner_name(options)
    min_epochs = options.prune_min_epochs or PRUNE_MIN_EPOCHS
    factor = options.prune_factor or PRUNE_FACTOR
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # pruned from step n_warmup_steps on, and steps are epochs trained
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min_epochs)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_epochs, reduction_factor=factor
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_epochs, max_resource=max(options.epochs, 1), reduction_factor=factor
        )
    raise StudyDefinitionError(f"Unknown pruner {name!r}: choose none, median, asha or hyperband.")


def pruner_args(options: RunOptions) -> str:
    """The settings of the session's pruner, for its parent run's tags."""
    pruner = make_pruner(options)
    if isinstance(pruner, optuna.pruners.NopPruner):
        return ""
    min_epochs = options.prune_min_epochs or PRUNE_MIN_EPOCHS
    if isinstance(pruner, optuna.pruners.MedianPruner):
        return f"min_epochs={min_epochs}"
    return f"min_epochs={min_epochs}, factor={options.prune_factor or PRUNE_FACTOR}"


def sampler_seed(options: RunOptions, n_trials: int) -> int:
    """A plain run on a SQLite storage is reproducible from its seed.  Processes that may run
    side by side (workers, or a shared server storage that other machines join) get distinct
    seeds, or their samplers would propose the same params."""
    seed = options.seed + n_trials
    if options.one_of_several or not options.storage.startswith("sqlite:"):
        seed += zlib.crc32(f"{hostname()}/{os.getpid()}".encode())
    return seed % (2**32)


class OptunaEngine:
    """The ``Engine`` of Optuna's samplers and pruners (call order: ``engines.Engine``)."""

    name = ENGINE

    def __init__(self, study: Study, options: RunOptions) -> None:
        self.study = study
        self.options = options
        self.grid: list[dict[str, Any]] | None = None
        self._pruner: optuna.pruners.BasePruner | None = None
        self._sampler: optuna.samplers.BaseSampler | None = None

    def check(self) -> None:
        make_pruner(self.options)  # an unknown pruner fails here, before any store is touched
        if self.options.strategy == "grid":
            self.grid = grid_points(self.study)  # refuses continuous params without grid values

    def sampler(self, n_trials: int) -> optuna.samplers.BaseSampler:
        # the last one made is the study's (``Engine`` call order): random search draws with it
        self._sampler = make_sampler(self.options.strategy, sampler_seed(self.options, n_trials))
        return self._sampler

    def info(self) -> dict[str, str]:
        """The pruner by its ``--pruner`` name (``searchlab.pruner``), with its settings."""
        return {"pruner": pruner_name(self.options), "pruner_args": pruner_args(self.options)}

    def open(self, store: StudyStore) -> None:
        self._pruner = make_pruner(self.options)
        store.ostudy.pruner = self._pruner

    def close(self) -> None:
        pass  # open holds nothing

    def propose(self, store: StudyStore, session: str) -> Proposal | Claim:
        """The next free grid point (grid search), else a proposal the sampler fills in."""
        if self.grid is not None:
            return propose_grid(store, self.grid, session)
        if self.options.strategy == "random" and self._sampler is not None:
            return self._untried(store, self._sampler)
        return Proposal()

    def _untried(self, store: StudyStore, sampler: optuna.samplers.BaseSampler) -> Proposal:
        """Random search's next configuration, drawn with the study's own sampler (so a seed
        reproduces the study) until no trial of the study has it, complete or running, at
        most ``MAX_COLLISIONS`` times; then the sampler's next draw, repeat or not."""
        live = (*FINISHED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        tried = {
            key(t.params or t.system_attrs.get("fixed_params") or {})
            for t in store.ostudy.get_trials(deepcopy=False)
            if t.state in live
        }
        if not tried:
            return Proposal()
        draws = optuna.create_study(sampler=sampler)  # in memory: the sampler's RNG only
        for collisions in range(MAX_COLLISIONS):
            params = self.study.search_space.suggest(draws.ask())
            if key(params) not in tried:
                if collisions:
                    log.info("random search: skipped %d configurations tried before", collisions)
                return Proposal(params=params)
        log.warning(
            "random search: %d draws in a row were configurations the study has tried: its "
            "space may be used up; running a repeat (a smaller --trials ends it sooner)",
            MAX_COLLISIONS,
        )
        return Proposal()

    def report(
        self, trial: Any, proposal: Proposal, epoch: int, logs: Mapping[str, float], last: bool
    ) -> bool:
        # pruning after the last epoch saves nothing and would discard a trained model
        return not last and bool(trial.should_prune())

    def tell(self, proposal: Proposal, result: TrialResult) -> None:
        pass  # the storage holds the result: the sampler reads it from there


__all__ = [
    "ENGINE",
    "OptunaEngine",
    "grid_points",
    "make_pruner",
    "make_sampler",
    "propose_grid",
    "pruner_args",
]
