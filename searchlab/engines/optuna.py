"""The Optuna engine: Optuna's samplers pick the params, its pruners stop bad trials early.

Strategies map to samplers: ``random`` (and ``hyperband``) -> ``RandomSampler``, ``bayesian``
-> ``TPESampler``, ``gp`` -> ``GPSampler``, ``grid`` -> the study's grid points, proposed in
order (``grid_points``) to a ``RandomSampler`` that only records them.  ``--pruner`` picks a
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
from optuna.trial import TrialState as OptunaState

from searchlab.coordination import SESSION_ATTR, hostname, key
from searchlab.errors import StudyDefinitionError
from searchlab.outcome import Claim, Proposal

if TYPE_CHECKING:
    from searchlab.engines import RunOptions
    from searchlab.outcome import TrialResult
    from searchlab.store import StudyStore
    from searchlab.study import Study

log = logging.getLogger(__name__)
ENGINE = "optuna"
FINISHED = (OptunaState.COMPLETE, OptunaState.PRUNED)


def make_sampler(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    if strategy in ("random", "grid", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "bayesian":
        # Optuna 5's TPE defaults are the ones we want: multivariate (params sampled jointly,
        # single objective) and constant_liar (--workers do not all propose the same point).
        # Pruned trials count as finished, also towards the 5 random start-up trials; TPE
        # ranks them below every complete trial (README, "Pruning").  5, not Optuna's 10:
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


def grid_points(study: Study) -> list[dict[str, Any]]:
    """The study's grid in the order it runs.  With a transfer builder's ``group_by`` (its
    cut-point parameter, e.g. ``frozen_layers``), points sharing that value run one after the
    other, so the feature cache of a cut point is computed once and reused."""
    from searchlab.cache import TransferBuilder

    points = study.search_space.grid()
    if isinstance(study.model, TransferBuilder):
        group = study.model.group_by
        points.sort(key=lambda p: repr(p.get(group)))  # stable: keeps the rest in grid order
    return points


def sampler_seed(options: RunOptions, n_trials: int) -> int:
    """A plain run on a SQLite storage is reproducible from its seed.  Processes that may run
    side by side (workers, or a shared server storage that other machines join) get distinct
    seeds, or their samplers would propose the same params."""
    seed = options.seed + n_trials
    if options.one_of_several or not options.storage.startswith("sqlite:"):
        seed += zlib.crc32(f"{hostname()}/{os.getpid()}".encode())
    return seed % (2**32)


def propose_grid(store: StudyStore, grid: list[dict[str, Any]], session: str) -> Proposal | Claim:
    """The first point of ``grid`` that no live or finished trial has, as a proposal.

    A trial claimed by another process may have no params in the storage yet; its grid point
    is in the system attr Optuna's ``enqueue_trial`` wrote.  A point that failed in this
    ``session`` is not retried before the next session (a deterministic failure would
    otherwise repeat until --max-failures).  With no free point, a WAITING trial is taken
    (a proposal without params), else ``Claim.WAIT`` while trials run, else ``Claim.DONE``.
    """
    trials = store.ostudy.get_trials(deepcopy=False)
    live = (*FINISHED, OptunaState.RUNNING, OptunaState.WAITING)
    taken = {
        key(t.params or t.system_attrs.get("fixed_params") or {})
        for t in trials
        if t.state in live
        or (t.state == OptunaState.FAIL and t.user_attrs.get(SESSION_ATTR) == session)
    }
    point = next((p for p in grid if key(p) not in taken), None)
    if point is None and not any(t.state == OptunaState.WAITING for t in trials):
        running = any(t.state == OptunaState.RUNNING for t in trials)
        return Claim.WAIT if running else Claim.DONE
    return Proposal(params=point, unique=True)


class OptunaEngine:
    """The ``Engine`` of Optuna's samplers and pruners (call order: ``engines.Engine``)."""

    name = ENGINE

    def __init__(self, study: Study, options: RunOptions) -> None:
        self.study = study
        self.options = options
        self.grid: list[dict[str, Any]] | None = None
        self._pruner: optuna.pruners.BasePruner | None = None

    def check(self) -> None:
        make_pruner(self.options)  # an unknown pruner fails here, before any store is touched
        if self.options.strategy == "grid":
            self.grid = grid_points(self.study)  # refuses continuous params without grid values

    def sampler(self, n_trials: int) -> optuna.samplers.BaseSampler:
        return make_sampler(self.options.strategy, sampler_seed(self.options, n_trials))

    def info(self) -> dict[str, str]:
        """The pruner by its ``--pruner`` name (``searchlab.pruner``), with its settings."""
        return {"pruner": pruner_name(self.options), "pruner_args": pruner_args(self.options)}

    def open(self, store: StudyStore) -> None:
        self._pruner = make_pruner(self.options)
        store.ostudy.pruner = self._pruner

    def propose(self, store: StudyStore, session: str) -> Proposal | Claim:
        """The next free grid point (grid search), else a proposal the sampler fills in."""
        if self.grid is None:
            return Proposal()
        return propose_grid(store, self.grid, session)

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
