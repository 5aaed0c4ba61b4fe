"""A study's results read back from the stores: the trials table, the best trial, and plots.

Nothing here is kept in memory between runs: the Optuna storage gives each trial's state,
value, params and per-epoch objective; MLflow gives the run ids, tags (such as whether the
feature cache was used) and artifacts.  Plots are Optuna's own (``optuna.visualization``):
matplotlib for PNG, plotly for interactive HTML.  This module is the only one that imports
the plotting libraries.

Call order for a report: ``open_results`` once (it fails with one line when the study was
never run or a store does not exist), then any of ``frame``, ``best_trial``, ``write_plots``
and ``log_plots``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab.errors import NotRunError
from searchlab.outcome import CACHE_REASON_TAG, cache_off_by_choice

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from searchlab.store import StudyStore
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker, RunRecord

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "parallel_coordinate", "param_importances", "learning_curves")
SESSION_ROLE = "session"
#: where sessions of searchlab before the MLflow Model logged the best model's .keras file
BEST_MODEL_PATH = "best_model/model.keras"
#: the session run's tag with its best model's URI (``tracking.MODEL_URI_TAG``)
MODEL_URI_TAG = "searchlab.model_uri"
PLOTS_ARTIFACT_PATH = "plots"
#: the one copy of plotly.js the HTML plots of a folder share
PLOTLY_JS = "plotly.min.js"


@dataclass(frozen=True)
class BestTrial:
    """The best complete trial of a study, with where its model lives in MLflow.

    ``model_uri`` is the complete best model, the MLflow Model logged on the session run that
    ended with this trial as its best (``models:/<model id>``: ``mlflow.keras.load_model``
    or ``mlflow.pyfunc.load_model`` load it; a session of an older searchlab logged the
    ``.keras`` file ``runs:/<session run>/best_model/model.keras``; None if no session
    finished since); ``weights_uri`` is the trial's own best-epoch weights (the complete
    model's ``best.weights.h5``, or for a trial trained on the feature cache
    ``best.suffix.npz``: the layers after the frozen prefix, see ``searchlab.cache``);
    ``tracking_uri`` is the MLflow store that holds them.
    """

    number: int
    value: float
    params: dict[str, Any]
    run_id: str | None
    model_uri: str | None
    weights_uri: str | None
    tracking_uri: str


@dataclass
class Results:
    """One study's results as the stores hold them."""

    study: Study
    store: StudyStore
    tracker: MlflowTracker
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def sessions(self) -> list[RunRecord]:
        """The study's parent (session) runs, oldest first."""
        return [r for r in self.runs if r.tags.get("searchlab.role") == SESSION_ROLE]

    @property
    def trial_runs(self) -> dict[str, RunRecord]:
        """Trial child runs by run id."""
        return {r.run_id: r for r in self.runs if r.tags.get("mlflow.parentRunId") is not None}


def open_results(study: Study, storage_url: str, tracker: MlflowTracker) -> Results:
    """Open the study's results; never creates a store, a study or an experiment.

    Raises ``StoreError`` when a store does not exist or cannot be reached and ``NotRunError``
    when the study was never run against these stores.
    """
    from searchlab import tracking
    from searchlab.store import StudyStore, redact

    tracking.check_exists(tracker.uri)
    store = StudyStore.load(study.name, storage_url)
    if not store.count():
        raise NotRunError(
            f"Study {study.name!r} has no trials yet: run it first (searchlab run STUDY_FILE)."
        )
    if tracker.find_experiment(study.name) is None:
        raise NotRunError(
            f"Study {study.name!r} has no MLflow experiment in {redact(tracker.uri)}: pass the "
            "--tracking-uri it ran with."
        )
    return Results(study=study, store=store, tracker=tracker, runs=tracker.runs(study.name))


def rows(results: Results) -> list[dict[str, Any]]:
    """One dict per trial: the Optuna trial joined with its MLflow run's searchlab tags."""
    by_id = results.trial_runs
    out = []
    for row in (t.row() for t in results.store.trials()):
        run = by_id.get(row.get("run_id") or "")
        # the feature cache, where a trial used it or could not (not where nothing asked for it)
        if run is not None and not (
            run.tags.get("searchlab.cache") == "off"
            and cache_off_by_choice(run.tags.get(CACHE_REASON_TAG, ""))
        ):
            for key, value in sorted(run.tags.items()):
                if key.startswith("searchlab.cache"):
                    row[key[len("searchlab.") :]] = value
        out.append(row)
    return out


def frame(results: Results) -> pd.DataFrame:
    """The trials table, best first (see ``searchlab.table.trials_frame``)."""
    from searchlab import table

    return table.trials_frame(rows(results), results.study.goal)


def best_trial(results: Results) -> BestTrial:
    best = results.store.best()
    if best is None:
        raise NotRunError(f"Study {results.study.name!r} has no complete trial yet.")
    run_id = best.run_id
    model_uri = None
    for session in reversed(results.sessions):
        if session.status == "FINISHED" and session.metrics.get("best_trial") == best.number:
            model_uri = (
                session.tags.get(MODEL_URI_TAG) or f"runs:/{session.run_id}/{BEST_MODEL_PATH}"
            )
            break
    from searchlab.training import SUFFIX_WEIGHTS_FILE, WEIGHTS_FILE

    run = results.trial_runs.get(run_id or "")
    suffix = run is not None and run.tags.get("searchlab.weights_form") == "suffix"
    weights = SUFFIX_WEIGHTS_FILE if suffix else WEIGHTS_FILE
    return BestTrial(
        number=best.number,
        value=float(best.value or 0.0),
        params=dict(best.params),
        run_id=run_id,
        model_uri=model_uri,
        weights_uri=f"runs:/{run_id}/weights/{weights}" if run_id else None,
        tracking_uri=results.tracker.uri,
    )


def write_plots(results: Results, folder: Path, top: int = 5) -> tuple[list[Path], dict[str, str]]:
    """Write every plot as PNG and HTML into ``folder``.

    Returns the files written and, for each plot that cannot be drawn from these trials
    (for instance importances from fewer than two complete trials), the reason.
    """
    from searchlab.outcome import TrialState

    ostudy = results.store.ostudy
    objective = results.study.objective
    complete = results.store.trials(TrialState.COMPLETE)
    best = results.store.best()
    if best is None:
        raise NotRunError(f"Study {results.study.name!r} has no complete trial: nothing to plot.")
    folder.mkdir(parents=True, exist_ok=True)
    top = max(1, min(top, len(complete)))
    curves = results.store.plot_copy(top)
    skipped: dict[str, str] = {}
    if len(complete) < 2:
        skipped["param_importances"] = "needs at least 2 complete trials"
    elif not any(len({repr(t.params.get(p)) for t in complete}) > 1 for p in best.params):
        skipped["param_importances"] = "every complete trial has the same params"
    if not any(t.intermediate_values for t in curves.get_trials(deepcopy=False)):
        skipped["learning_curves"] = f"no trial reported {objective} per epoch"
    titles = {
        "optimization_history": f"Optimization history ({objective}, best so far)",
        "parallel_coordinate": f"Parameters vs {objective}",
        "param_importances": f"Parameter importances for {objective}",
        "learning_curves": f"Learning curves of the top {top} trials ({objective} per epoch)",
    }
    ranked = [t.number for t in results.store.top(top)]  # the learning curves' legend order
    written: list[Path] = []
    for name in PLOTS:
        if name in skipped:
            continue
        source = curves if name == "learning_curves" else ostudy
        written += _draw(name, source, objective, titles[name], folder, ranked)
    if written:  # the HTML plots load this one copy of plotly.js, beside them
        written.append(folder / PLOTLY_JS)
    return written, skipped


def _draw(
    name: str,
    ostudy: optuna.Study,
    objective: str,
    title: str,
    folder: Path,
    ranked: list[int],
) -> list[Path]:
    """One of Optuna's plots as interactive HTML (plotly) and PNG (matplotlib), made legible:
    room for every axis's labels, log axes without crowded minor labels, learning curves in
    rank order (``ranked``: trial numbers, best first) with a colour each."""
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    kwargs: dict[str, Any] = {} if name == "learning_curves" else {"target_name": objective}
    plot = "intermediate_values" if name == "learning_curves" else name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        fig = getattr(vis, f"plot_{plot}")(ostudy, **kwargs)
        axes = getattr(vis_mpl, f"plot_{plot}")(ostudy, **kwargs)
    fig.update_layout(title=title)
    figure = _figure_of(axes)
    ax = figure.axes[0]
    if name == "parallel_coordinate":
        _legible_parallel_coordinate(figure)
        dimensions = sum(len(t.dimensions) for t in fig.data if t.type == "parcoords")
        fig.update_layout(width=max(700, 160 * dimensions))
    if name == "learning_curves":
        fig.update_layout(yaxis_title=objective, xaxis_title="epochs trained")
        _rank_curves(fig, ax, ranked)
    html = folder / f"{name}.html"
    # one plotly.js beside the pages (PLOTLY_JS) instead of 4.8 MB inside each of them
    fig.write_html(html, include_plotlyjs="directory", full_html=True)
    for loc in ("left", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(title, pad=12)
    if name in ("learning_curves", "optimization_history"):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if name == "learning_curves":
        ax.set_ylabel(objective)
        ax.set_xlabel("epochs trained")
    png = folder / f"{name}.png"
    figure.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [png, html]


def _legible_parallel_coordinate(figure: Any) -> None:
    """Optuna's matplotlib parallel coordinates, legible: as wide as its axes need, a
    colour scale on which the worst trial shows (not white-to-blue), no grid behind the
    lines, and log axes with their decades labelled only (the minor labels overlapped)."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    main = figure.axes[0]
    for lines in main.collections:
        if isinstance(lines, LineCollection) and lines.get_cmap().name.startswith("Blues"):
            reverse = lines.get_cmap().name.endswith("_r")
            lines.set_cmap("viridis_r" if reverse else "viridis")
    axes = [a for a in figure.axes if a is not main and a.get_label() != "<colorbar>"]
    figure.set_size_inches(max(8.0, 1.9 * (len(axes) + 1) + 2.0), 5.5)
    main.grid(False)
    for twin in axes:
        twin.grid(False)
        twin.tick_params(labelsize=8)
        if twin.get_yscale() == "log":  # 1, 2, 5 per decade, as plain numbers
            twin.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            twin.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            twin.yaxis.set_minor_formatter(NullFormatter())
    for label in main.get_xticklabels():
        label.set_rotation(20)
        label.set_horizontalalignment("right")


def _rank_curves(fig: Any, ax: Any, ranked: list[int]) -> None:
    """Learning curves listed best first in both legends, one distinct colour per trial."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    rank = {f"Trial{number}": i for i, number in enumerate(ranked)}
    for trace in fig.data:
        i = rank.get(trace.name)
        if i is not None:
            red, green, blue = (int(255 * c) for c in colours(i % 10)[:3])
            hexa = f"#{red:02x}{green:02x}{blue:02x}"
            trace.update(legendrank=i + 1, line={"color": hexa}, marker={"color": hexa})
    lines = {line.get_label(): line for line in ax.get_lines()}
    ordered = [lines[n] for n in sorted(lines, key=lambda n: rank.get(n, len(rank))) if n in rank]
    for i, line in enumerate(ordered):
        line.set_color(colours(i % 10))
    if ordered:
        ax.legend(
            ordered,
            [f"#{n[len('Trial') :]}" for n in (line.get_label() for line in ordered)],
            title="trials, best first",
            bbox_to_anchor=(1.05, 1),
            loc="upper left",
            borderaxespad=0.0,
        )


def _figure_of(axes: Any) -> Any:
    if hasattr(axes, "figure"):
        return axes.figure
    return axes.flat[0].figure  # an array of Axes (one per objective)


def log_plots(results: Results, files: list[Path]) -> str | None:
    """Log plot files on the study's latest session run; return its run id (None: no run)."""
    sessions = results.sessions
    if not sessions or not files:
        return None
    run_id = sessions[-1].run_id
    results.tracker.log_run_files(run_id, files, PLOTS_ARTIFACT_PATH)
    return run_id


def to_json(results: Results, frame: pd.DataFrame) -> str:
    """The study and its trials, best first, as one JSON object (``searchlab report --json``):
    ``study``, ``objective``, ``direction``, ``counts`` (by state), ``best`` (number, value,
    params, run id, model URI, the MLflow store with its password hidden; null before a
    complete trial) and ``trials`` (the table's
    rows: ``number``, ``state``, ``value``, ..., ``params.<name>``)."""
    import json

    from searchlab import table

    study = results.study
    counts: dict[str, int] = {}
    for row in rows(results):
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    from searchlab.store import redact

    try:
        best = dataclasses.asdict(best_trial(results))
        best["tracking_uri"] = redact(best["tracking_uri"])  # printed: no password
    except NotRunError:
        best = None
    return json.dumps(
        {
            "study": study.name,
            "objective": study.objective,
            "direction": study.goal,
            "counts": counts,
            "best": best,
            "trials": table.to_records(frame),
        },
        default=str,
    )


def summary_line(results: Results) -> str:
    counts: dict[str, int] = {}
    for row in rows(results):
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    study = results.study
    return (
        f"study {study.name}: {sum(counts.values())} trials ({parts}); objective "
        f"{study.objective} ({study.goal}), best first"
    )


def resolve(
    study_or_path: Study | str | Path,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> Results:
    """Open results for a ``Study`` or a study file path, on the given or default stores."""
    from searchlab import config
    from searchlab.study import Study, load_study
    from searchlab.tracking import MlflowTracker

    study = study_or_path if isinstance(study_or_path, Study) else load_study(study_or_path)
    tracker = MlflowTracker(
        tracking_uri or config.default_tracking_uri(), config.default_artifact_root()
    )
    return open_results(study, storage or config.default_storage(), tracker)


def results(
    study_or_path: Study | str | Path,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """A study's trials as a pandas DataFrame, best first.

    Columns: ``number``, ``state``, ``value`` (the objective), ``epochs``, ``duration_s``,
    ``run_id`` (the trial's MLflow run), ``params.<name>`` per parameter, and ``cache*``
    columns when trials used the feature cache.

    Example::

        import searchlab
        df = searchlab.results("studies/mnist_dense.py")
        df.head()
    """
    return frame(resolve(study_or_path, storage, tracking_uri))


def best(
    study_or_path: Study | str | Path,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> BestTrial:
    """The best complete trial: ``number``, ``value``, ``params``, ``run_id``, ``model_uri``.

    Example::

        b = searchlab.best("studies/mnist_dense.py")
        mlflow.set_tracking_uri(b.tracking_uri)
        model = mlflow.keras.load_model(b.model_uri)
    """
    return best_trial(resolve(study_or_path, storage, tracking_uri))
