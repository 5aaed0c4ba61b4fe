"""The Optuna engine: samplers, storage, the ask/tell loop, budget and resume.

The study lives in an Optuna storage (SQLite by default, any SQLAlchemy URL with
``--storage``).  Running a study again loads it and continues until ``trials`` trials have
completed (pruned trials count, failed ones do not); a grid point that completed is never run
again.  Each trial is one MLflow child run; its id is kept as the Optuna trial's user attr
``mlflow_run_id``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState as OptunaState

from searchlab import data as data_mod
from searchlab.errors import NotRunError, SearchlabError, StoreError, StudyDefinitionError
from searchlab.space import Space

if TYPE_CHECKING:
    from searchlab.engines import RunOptions, SearchListener
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker
    from searchlab.trial import TrialResult

log = logging.getLogger(__name__)
ENGINE = "optuna"
RUN_ID_ATTR = "mlflow_run_id"
SPACE_ATTR = "searchlab.space"
FINISHED = (OptunaState.COMPLETE, OptunaState.PRUNED)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL, or raise ``StoreError`` with one line that says why."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": 60}}
        elif url.startswith(("postgresql", "mysql")):
            kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"Cannot open the Optuna storage {_redact(url)}: {first}. "
            "Check --storage (for PostgreSQL: host, port, user, password, database)."
        ) from exc


def load_stored(name: str, url: str) -> optuna.Study:
    """The stored Optuna study ``name`` for reading results; never creates a store or a study.

    Raises ``StoreError`` when a local SQLite storage file does not exist, and ``NotRunError``
    when the storage holds no study of that name.
    """
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise StoreError(
            f"No Optuna storage at {url[len('sqlite:///'):]}: the study was never run here. "
            "Run it first (searchlab run STUDY_FILE), or pass the --storage it ran with."
        )
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise NotRunError(
            f"Study {name!r} was never run: {_redact(url)} holds no study of that name. Run it "
            "first (searchlab run STUDY_FILE), or pass the --storage it ran with."
        ) from None


def top_trials(ostudy: optuna.Study, k: int) -> optuna.Study:
    """An in-memory copy of ``ostudy`` in which only the ``k`` best complete trials keep their
    per-epoch (intermediate) values; trial numbers are kept, so plots name the real trials."""
    complete = ostudy.get_trials(deepcopy=False, states=(OptunaState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: t.value, reverse=ostudy.direction.name == "MAXIMIZE")
    keep = {t.number for t in ranked[:k]}
    copy = optuna.create_study(study_name=ostudy.study_name, direction=ostudy.direction)
    for t in ostudy.get_trials(deepcopy=False):
        if t.number in keep:
            copy.add_trial(t)
        else:  # a placeholder keeps the numbering; it has no curve to draw
            copy.add_trial(optuna.trial.create_trial(state=OptunaState.FAIL))
    return copy


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def make_sampler(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    if strategy in ("random", "grid", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "bayesian":
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


def make_pruner(options: RunOptions) -> optuna.pruners.BasePruner:
    """``--pruner``: none (never prune), median, asha (successive halving) or hyperband.

    Steps are epochs trained (1, 2, ...).  Strategy ``hyperband`` means random sampling with
    the Hyperband pruner unless another pruner is named.
    """
    name = options.pruner
    if name == "none" and options.strategy == "hyperband":
        name = "hyperband"
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(options.epochs, 1), reduction_factor=3
        )
    raise StudyDefinitionError(f"Unknown pruner {name!r}: choose none, median, asha or hyperband.")


def _key(params: Mapping[str, Any]) -> tuple:
    def norm(v: Any) -> Any:
        return float(f"{v:.12g}") if isinstance(v, float) else v

    return tuple(sorted((k, norm(v)) for k, v in params.items()))


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


def load_optuna_study(
    study: Study, storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler
) -> optuna.Study:
    ostudy = optuna.create_study(
        study_name=study.name,
        storage=storage,
        sampler=sampler,
        pruner=optuna.pruners.NopPruner(),  # not Optuna's default MedianPruner: run() sets it
        direction=study.direction,
        load_if_exists=True,
    )
    described = {**study.search_space.describe(), "_objective": study.objective}
    stored = ostudy.user_attrs.get(SPACE_ATTR)
    if stored is None:
        ostudy.set_user_attr(SPACE_ATTR, described)
    elif stored != described:
        changed = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
        raise StudyDefinitionError(
            f"The storage already holds a study named {study.name!r} with a different space or "
            f"objective (differs in: {', '.join(changed)}). Give the study a new name, or use "
            "another --storage."
        )
    if ostudy.direction.name.lower() != study.direction:
        raise StudyDefinitionError(
            f"The storage holds study {study.name!r} with direction "
            f"{ostudy.direction.name.lower()}, but the study file says {study.direction}. "
            "Give the study a new name."
        )
    return ostudy


def _next_grid_point(
    ostudy: optuna.Study, space: Space, failed_here: set[tuple], group: str | None = None
) -> dict[str, Any] | None:
    """The first grid point with no finished or running trial.  A point whose trial failed in
    an earlier session (a crash, say) is tried again once; one that failed in this session
    is not retried.  With ``group`` (a transfer builder's cut-point parameter, e.g.
    ``frozen_layers``), points sharing its value run one after the other, so the feature
    cache of that cut point is reused."""
    taken = {
        _key(t.params)
        for t in ostudy.get_trials(deepcopy=False)
        if t.state in (*FINISHED, OptunaState.RUNNING, OptunaState.WAITING)
    } | failed_here
    points = space.grid()
    if group is not None:
        points.sort(key=lambda p: repr(p.get(group)))  # stable: keeps the rest in grid order
    for point in points:
        if _key(point) not in taken:
            return point
    return None


def _row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    state = {
        OptunaState.COMPLETE: "complete",
        OptunaState.PRUNED: "pruned",
        OptunaState.FAIL: "failed",
        OptunaState.RUNNING: "running",
        OptunaState.WAITING: "waiting",
    }[t.state]
    duration = t.duration.total_seconds() if t.duration else None
    return {
        "number": t.number,
        "state": state,
        "value": t.value if t.state == OptunaState.COMPLETE else None,
        "epochs": t.user_attrs.get("epochs_run"),
        "duration_s": duration,
        "run_id": t.user_attrs.get(RUN_ID_ATTR),
        "params": dict(t.params),
    }


def trial_rows(ostudy: optuna.Study) -> list[dict[str, Any]]:
    return [_row(t) for t in ostudy.get_trials(deepcopy=False)]


def _best(ostudy: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = ostudy.get_trials(deepcopy=False, states=(OptunaState.COMPLETE,))
    if not complete:
        return None
    return ostudy.best_trial


def run(
    study: Study,
    options: RunOptions,
    tracker: MlflowTracker,
    listener: SearchListener,
) -> dict[str, Any]:
    """Run or continue ``study``; see the module docstring."""
    space = study.search_space
    target = budget(study, options)
    if options.strategy == "grid":
        space.grid()  # refuses continuous parameters without grid values, before anything runs
    loaded = data_mod.load(study.dataset, options.data_dir)
    storage = open_storage(options.storage)
    tracker.connect()
    ostudy = load_optuna_study(study, storage, make_sampler(options.strategy, 0))
    ostudy.sampler = make_sampler(options.strategy, options.seed + len(ostudy.trials))
    ostudy.pruner = make_pruner(options)

    from searchlab import trial as trial_mod

    spec = trial_mod.TrialSpec(
        build=study.model,
        data=loaded,
        epochs=options.epochs,
        objective=study.objective,
        direction=study.direction,
        batch_size=study.batch_size,
        seed=options.seed,
        precision=options.precision,
    )
    info = {
        "strategy": options.strategy,
        "engine": ENGINE,
        "objective": study.objective,
        "direction": study.direction,
        "budget": target if target is not None else "timeout",
        "epochs": options.epochs,
        "pruner": type(ostudy.pruner).__name__,
        "seed": options.seed,
        "storage": _redact(options.storage),
        "data": loaded.source,
        "optuna_study": study.name,
        "precision": options.precision,
        "space": space.describe(),
        "run_params": {"precision": options.precision},
    }
    from searchlab import backend

    info.update(backend.session_info())  # backend, versions, devices: tags of the parent run
    tracker.start_study(study.name, info)
    base_tags = {
        "searchlab.study": study.name,
        "searchlab.strategy": options.strategy,
        "searchlab.engine": ENGINE,
        **{str(k): str(v) for k, v in study.tags.items()},
    }
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    started = time.monotonic()
    consecutive_failures = 0
    failed_here: set[tuple] = set()
    status = "FAILED"

    def finished_count() -> int:
        return len(ostudy.get_trials(deepcopy=False, states=FINISHED))

    try:
        listener.started(study.name, finished_count(), target, info)
        with tempfile.TemporaryDirectory(prefix="searchlab-trial-") as tmp:
            while True:
                done = finished_count()
                if target is not None and done >= target:
                    break
                if options.timeout is not None and time.monotonic() - started >= options.timeout:
                    log.info("time budget of %ss reached", options.timeout)
                    break
                if options.strategy == "grid":
                    point = _next_grid_point(
                        ostudy, space, failed_here, getattr(study.model, "group_by", None)
                    )
                    if point is None:
                        break
                    ostudy.enqueue_trial(point)
                result = _one_trial(
                    ostudy, space, spec, tracker, listener, base_tags, Path(tmp), done, target
                )
                counts[result.state.value] += 1
                if result.state.value == "failed":
                    failed_here.add(_key(result.params))
                    consecutive_failures += 1
                    if consecutive_failures >= options.max_failures:
                        raise SearchlabError(
                            f"Stopped after {consecutive_failures} failed trials in a row "
                            f"(--max-failures {options.max_failures}). Last error: "
                            f"{(result.error or '').splitlines()[0]}"
                        )
                else:
                    consecutive_failures = 0
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
    space: Space,
    spec: Any,
    tracker: MlflowTracker,
    listener: SearchListener,
    base_tags: Mapping[str, str],
    tmp: Path,
    done: int,
    target: int | None,
) -> TrialResult:
    from searchlab.trial import TrialResult, TrialState, run_trial

    otrial = ostudy.ask()
    try:
        params = space.suggest(otrial)
    except BaseException:
        ostudy.tell(otrial, state=OptunaState.FAIL)
        raise
    number = otrial.number
    listener.trial_started(number, done + 1, target, params)
    tags = {
        **base_tags,
        "searchlab.input_shape": ",".join(map(str, spec.data.input_shape)),
        "searchlab.num_classes": str(spec.data.num_classes),
    }
    run_id: str | None = None

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        assert run_id is not None
        tracker.log_epoch(run_id, epoch, logs)
        value = logs.get(spec.objective)
        if value is not None and math.isfinite(value):
            otrial.report(value, epoch + 1)  # step = epochs trained, as pruners expect; also
            # Optuna's learning curves (report, dashboard)
            # pruning after the last epoch saves nothing and would discard a trained model
            if epoch + 1 < spec.epochs and otrial.should_prune():
                from searchlab.errors import TrialPruned

                raise TrialPruned(epoch)

    try:
        run_id = tracker.start_trial(number, params, tags)
        otrial.set_user_attr(RUN_ID_ATTR, run_id)
        result = run_trial(number, params, spec, tmp / f"trial-{number}", on_epoch)
    except BaseException as exc:  # Ctrl-C, a study-level or store error: close it, then stop
        error = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
        result = TrialResult(number, params, TrialState.FAILED, error=error)
        _finish(ostudy, otrial, tracker, run_id, result)
        raise
    _finish(ostudy, otrial, tracker, run_id, result)
    best = _best(ostudy)
    listener.trial_finished(
        result,
        {"number": best.number, "value": best.value, "params": best.params} if best else None,
    )
    return result


def _finish(
    ostudy: optuna.Study,
    otrial: optuna.Trial,
    tracker: MlflowTracker,
    run_id: str | None,
    result: Any,
) -> None:
    """MLflow first, then Optuna: a crash in between leaves Optuna RUNNING (it is failed as
    stale on resume), never a COMPLETE Optuna trial without its MLflow weights."""
    try:
        otrial.set_user_attr("epochs_run", result.epochs_run)
        if result.error:
            otrial.set_user_attr("error", result.error[:2000])
        if run_id is not None:
            tracker.end_trial(run_id, result)
    except Exception:
        ostudy.tell(otrial, state=OptunaState.FAIL, skip_if_finished=True)
        raise
    state = result.state.value
    if state == "complete":
        ostudy.tell(otrial, result.value)
    elif state == "pruned":
        ostudy.tell(otrial, state=OptunaState.PRUNED)
    else:
        ostudy.tell(otrial, state=OptunaState.FAIL)


def _summary(ostudy: optuna.Study, counts: Mapping[str, int], started: float) -> dict[str, Any]:
    trials = ostudy.get_trials(deepcopy=False)
    best = _best(ostudy)
    return {
        "n_complete": sum(t.state == OptunaState.COMPLETE for t in trials),
        "n_pruned": sum(t.state == OptunaState.PRUNED for t in trials),
        "n_failed": sum(t.state == OptunaState.FAIL for t in trials),
        "session_complete": counts["complete"],
        "session_pruned": counts["pruned"],
        "session_failed": counts["failed"],
        "session_seconds": time.monotonic() - started,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "best_run_id": best.user_attrs.get(RUN_ID_ATTR) if best else None,
        **_reeval_summary(ostudy),
    }


def _reeval_summary(ostudy: optuna.Study) -> dict[str, Any]:
    """Re-evaluation's choice (by mean objective over seeds), when the study has one."""
    from searchlab import reeval

    return reeval.summary(ostudy)


def _log_study_artifacts(
    study: Study, ostudy: optuna.Study, spec: Any, tracker: MlflowTracker, summary: Mapping[str, Any]
) -> None:
    """The trials table (CSV) and the best model (.keras) go on the session's parent run."""
    from searchlab import table

    with tempfile.TemporaryDirectory(prefix="searchlab-study-") as tmp:
        frame = table.trials_frame(trial_rows(ostudy), study.direction)
        tracker.log_artifact(table.write_csv(frame, Path(tmp) / "trials.csv"))
        run_id = summary.get("selected_run_id") or summary.get("best_run_id")
        params = summary.get("selected_params") or summary["best_params"]
        if not run_id:
            return
        from searchlab import trial as trial_mod
        from searchlab.data import info_of

        weights = tracker.download(run_id, f"weights/{trial_mod.WEIGHTS_FILE}", Path(tmp))
        model = trial_mod.load_trained(spec.build, params, info_of(spec.data), weights)
        path = Path(tmp) / "model.keras"
        model.save(path)
        tracker.log_artifact(path, "best_model")
