"""searchlab's own grid search, shared by both engines: the points in order, and the next
free one under the study lock.

The state of a grid search is the Optuna storage itself (which points are complete, running,
or failed in this session), so any number of processes share one grid and any session
continues it, whichever engine ran the earlier ones.  The keras-tuner engine uses it too:
KerasTuner's ``GridSearchOracle`` keeps its order in memory only and cannot continue after a
reload (KerasTuner #1055).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState as OptunaState

from searchlab.coordination import FINISHED, SESSION_ATTR, key
from searchlab.outcome import Claim, Proposal

if TYPE_CHECKING:
    from searchlab.store import StudyStore
    from searchlab.study import Study


def grid_points(study: Study) -> list[dict[str, Any]]:
    """The study's grid in the order it runs.  With a transfer builder's ``group_by`` (its
    cut-point parameter, e.g. ``frozen_layers``), points sharing that value run one after the
    other, so the feature cache of a cut point is computed once and reused."""
    from searchlab.training.cache import TransferBuilder

    points = study.search_space.grid()
    if isinstance(study.model, TransferBuilder):
        group = study.model.group_by
        points.sort(key=lambda p: repr(p.get(group)))  # stable: keeps the rest in grid order
    return points


def propose_grid(store: StudyStore, grid: list[dict[str, Any]], session: str) -> Proposal | Claim:
    """The first point of ``grid`` that no live or finished trial has, as a proposal.

    Called under the study lock (``coordination.claim_trial``, which has failed any WAITING
    trial a dead claimer left).  A trial claimed by another process may have no params in
    the storage yet; its grid point is in the system attr Optuna's ``enqueue_trial`` wrote.
    A point that failed in this ``session`` is not retried before the next session (a
    deterministic failure would otherwise repeat until --max-failures).  With no free point:
    ``Claim.WAIT`` while trials run (one may fail and free its point), else ``Claim.DONE``.
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
    if point is None:
        running = any(t.state == OptunaState.RUNNING for t in trials)
        return Claim.WAIT if running else Claim.DONE
    return Proposal(params=point, unique=True)


__all__ = ["grid_points", "propose_grid"]
