"""Top-k re-evaluation: re-train the best configurations with other seeds, pick by the mean.

A search ranks configurations by one training run each, so a lucky seed can decide what is
exported.  ``reevaluate`` re-trains the ``top`` best complete trials ``seeds`` times each
(seeds the search never used), logs every run as an MLflow child run of the session tagged
``searchlab.role=reeval`` (with the trial it re-evaluates and the seed), and keeps the
result in the Optuna study's user attr ``searchlab.reeval``: trial number -> mean, std, n,
values and run ids.  From then on the study's selected configuration is the one with the best
mean objective; ``summary`` reports it and ``export`` exports it (the original trial's
weights).  Both engines call this after their search loop, before the session ends.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab.data import classes_tag
from searchlab.outcome import TrialState

if TYPE_CHECKING:
    from searchlab.store import StoredTrial, StudyStore
    from searchlab.tracking import Tracker
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)
ATTR = "searchlab.reeval"
#: offset between the seeds of successive re-evaluation runs (the search used spec.seed)
SEED_STRIDE = 7919


def reeval_seed(seed: int, index: int) -> int:
    return seed + SEED_STRIDE * (index + 1)


def choose(results: Mapping[str, Mapping[str, Any]], direction: str) -> str | None:
    """The key of the entry with the best mean (ties: the lower trial number); None if none."""
    scored = [(k, v["mean"]) for k, v in results.items() if v.get("mean") is not None]
    if not scored:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(scored, key=lambda kv: (sign * kv[1], int(kv[0])))[0]


def reevaluate(
    store: StudyStore,
    spec: TrialSpec,
    tracker: Tracker,
    base_tags: Mapping[str, str],
    top: int,
    seeds: int,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    """Re-train the ``top`` best configurations ``seeds`` times; store and return the results."""
    from searchlab import table

    results: dict[str, dict[str, Any]] = dict(store.attr(ATTR) or {})
    for trial in store.top(top):
        values: list[float] = []
        run_ids: list[str] = []
        for index in range(seeds):
            run_id, result = _retrain(trial, index, spec, tracker, base_tags, workdir)
            run_ids.append(run_id)
            if result.state is TrialState.COMPLETE and result.value is not None:
                values.append(float(result.value))
        results[str(trial.number)] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            "n": len(values),
            "values": values,
            "run_ids": run_ids,
            "search_value": trial.value,
        }
    store.set_attr(ATTR, results)
    rows = [
        {"trial": int(k), **{f: v.get(f) for f in ("mean", "std", "n", "search_value")}}
        for k, v in results.items()
    ]
    with tempfile.TemporaryDirectory(prefix="searchlab-reeval-") as tmp:
        frame = table.reeval_frame(rows, spec.direction)
        tracker.log_artifact(table.write_csv(frame, Path(tmp) / "reeval.csv"))
    return results


def _retrain(
    trial: StoredTrial,
    index: int,
    spec: TrialSpec,
    tracker: Tracker,
    base_tags: Mapping[str, str],
    workdir: Path,
) -> tuple[str, Any]:
    """Re-train ``trial``'s configuration with its ``index``-th re-evaluation seed, as a
    child run of the session; return the run id and the result."""
    from searchlab.training import run_trial

    seed = reeval_seed(spec.seed, index)
    tags = {
        **base_tags,
        "searchlab.role": "reeval",
        "searchlab.reeval_of": str(trial.number),
        "searchlab.reeval_seed": str(seed),
        "searchlab.reeval_source_run": str(trial.run_id or ""),
        "searchlab.input_shape": ",".join(map(str, spec.data.input_shape)),
        "searchlab.num_classes": classes_tag(spec.data.num_classes),
    }
    run_id = tracker.start_trial(
        trial.number, trial.params, tags, run_name=f"reeval-{trial.number:04d}-s{index}"
    )

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        tracker.log_epoch(run_id, epoch + 1, logs)  # numbered from 1, as a trial's

    result = run_trial(
        trial.number,
        trial.params,
        dataclasses.replace(spec, seed=seed),
        workdir / f"trial-{trial.number}-s{index}",
        on_epoch,
    )
    tracker.end_trial(run_id, result)
    log.info("re-evaluated trial %d seed %d: %s", trial.number, seed, result.value)
    return run_id, result


def summary(store: StudyStore) -> dict[str, Any]:
    """The study's selected configuration by mean objective, for the session summary."""
    results = store.attr(ATTR) or {}
    key = choose(results, store.direction)
    if key is None:
        return {}
    trial = store.trial(int(key))
    chosen = results[key]
    out: dict[str, Any] = {
        "selected_trial": int(key),
        "selected_params": dict(trial.params),
        "selected_run_id": trial.run_id,
        "reeval_mean": chosen["mean"],
        "reeval_std": chosen["std"],
        "reeval_n": chosen["n"],
    }
    for number, entry in results.items():  # mean ± std of every re-evaluated trial
        if entry.get("mean") is not None:
            out[f"reeval_{number}_mean"] = entry["mean"]
            out[f"reeval_{number}_std"] = entry["std"]
    return out


def selected_number(store: StudyStore) -> int | None:
    """The trial number export should use by default: the best mean, if re-evaluated."""
    key = choose(store.attr(ATTR) or {}, store.direction)
    return int(key) if key is not None else None
