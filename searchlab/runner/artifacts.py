"""What a finished session leaves on its parent run: the trials table (CSV) and the best
model, rebuilt from its trial's weights, logged as an MLflow Model and registered with
``--register`` (``Session.log_artifacts``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab.data import class_names_json
from searchlab.runner.trials import first_line

if TYPE_CHECKING:
    from searchlab.store import StudyStore
    from searchlab.study import Study
    from searchlab.tracking import Tracker
    from searchlab.training import TrialSpec

log = logging.getLogger(__name__)
#: raw inputs the best model's MLflow signature is inferred from
MODEL_SAMPLE = 2


def log_study_artifacts(
    study: Study,
    store: StudyStore,
    tracker: Tracker,
    register: str | None,
    spec: TrialSpec,
    summary: dict[str, Any],
) -> None:
    """The trials table (CSV) and the best model go on the session's parent run: the
    complete Keras model (also for a trial trained on cached features), rebuilt from the
    trial's weights and logged as an MLflow Model (``Tracker.log_model``); registered too
    with ``register``.  Adds ``model_uri`` (and ``registered``) to ``summary``."""
    from searchlab import table
    from searchlab import training as trial_mod
    from searchlab.data import info_of

    with tempfile.TemporaryDirectory(prefix="searchlab-study-") as tmp:
        rows = [t.row() for t in store.trials()]
        frame = table.trials_frame(rows, study.goal)
        tracker.log_artifact(table.write_csv(frame, Path(tmp) / "trials.csv"))
        run_id = summary.get("selected_run_id") or summary.get("best_run_id")
        params = summary.get("selected_params") or summary["best_params"]
        if not run_id:
            return
        weights = tracker.download(run_id, "weights", Path(tmp))  # either form: see training
        model = trial_mod.load_trained(spec.build, params, info_of(spec.data), weights)
        try:
            log_best_model(study, store, tracker, register, spec, summary, model, run_id)
        except (ValueError, TypeError) as exc:  # its inputs are not the data's (a HyperModel
            # fit that crops or transforms x): the trials' weights are kept, the study is done
            log.warning(
                "the best model was not logged as an MLflow Model: it does not take the "
                "study's inputs as they are (%s)",
                first_line(str(exc)),
            )


def log_best_model(
    study: Study,
    store: StudyStore,
    tracker: Tracker,
    register: str | None,
    spec: TrialSpec,
    summary: dict[str, Any],
    model: Any,
    run_id: str,
) -> None:
    """Log ``model``, trial run ``run_id``'s complete model, as the session's MLflow Model
    and register it under ``register`` when the session was asked to (``--register``)."""
    from searchlab import backend
    from searchlab.tracking import TRIAL_RUN_TAG, ModelScore

    number = summary.get("selected_trial")
    number = summary["best_trial"] if number is None else number
    value = store.trial(int(number)).value
    tags = {
        "searchlab.study": study.name,
        "searchlab.trial": str(number),
        TRIAL_RUN_TAG: run_id,
        "searchlab.objective": study.objective,
    }
    if spec.data.class_names is not None:  # predicted class id i is the i-th name
        tags["searchlab.class_names"] = class_names_json(spec.data.class_names)
    x = spec.data.x_val if len(spec.data.x_val) else spec.data.x_train
    sample = x[:MODEL_SAMPLE]
    uri = tracker.log_model(
        model,
        (sample, backend.outputs_of(model, sample)),
        requirements=backend.model_requirements(),
        tags=tags,
        params=store.trial(int(number)).params,
        trial_run=run_id,
    )
    summary["model_uri"] = uri
    if register and value is not None:
        score = ModelScore(study.objective, study.goal, float(value))
        summary["registered"] = tracker.register_model(uri, register, score, tags=tags)
