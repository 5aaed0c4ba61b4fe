"""Export a study's best (or a chosen) trial as a complete Keras model file.

Reads from the stores, not from memory: the trial is looked up in the Optuna storage, its
best weights are downloaded from its MLflow run, and the model is rebuilt with the study's
builder and its params.  A trial trained on the feature cache logged only the weights after
the frozen prefix (``weights/best.suffix.npz``, tag ``searchlab.weights_form=suffix``): the
rebuilt model brings the prefix, checked against the fingerprint the trial recorded.  ``.h5`` writes legacy HDF5, ``.keras`` the Keras format.

``export_logged`` writes the Keras model of an MLflow Model instead: a registered one
(``models:/NAME@champion``, ``models:/NAME/3``) or a session's best model (``models:/<id>``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from searchlab.errors import ExportError, NotRunError, StoreError, hide_password

if TYPE_CHECKING:
    from searchlab.store import StoredTrial
    from searchlab.study import Study
    from searchlab.tracking import MlflowTracker

FORMATS = (".h5", ".keras")
#: beside ``best.h5``: ``best.class_names.json``, the folder's class names by class id
CLASS_NAMES_SUFFIX = ".class_names.json"
#: what ``searchlab export`` takes in place of a study file: an MLflow model URI
MODEL_URI_PREFIXES = ("models:/", "runs:/")


def find_trial(study: Study, storage_url: str, number: int | None = None) -> StoredTrial:
    """The best complete trial (or trial ``number``) of ``study`` in the Optuna storage."""
    from searchlab.outcome import TrialState
    from searchlab.store import StudyStore, redact, sqlite_path

    path = sqlite_path(storage_url)
    try:
        if path is not None and not path.is_file():  # nothing to read, and nothing created
            raise NotRunError(study.name)
        store = StudyStore.load(study.name, storage_url)
    except NotRunError:
        raise ExportError(
            f"No study named {study.name!r} in {redact(storage_url)}. Run it first "
            "(searchlab run STUDY_FILE), or pass the --storage it ran with."
        ) from None
    complete = store.trials(TrialState.COMPLETE)
    if number is None:
        if not complete:
            raise ExportError(f"Study {study.name!r} has no complete trial yet: nothing to export.")
        from searchlab.reeval import selected_number

        number = selected_number(store)  # re-evaluated: the best mean over seeds decides
        if number is None:
            best = store.best()
            assert best is not None  # there are complete trials
            return best
    chosen = [t for t in complete if t.number == number]
    if not chosen:
        raise ExportError(
            f"Study {study.name!r} has no complete trial number {number}; complete trials: "
            f"{', '.join(str(t.number) for t in complete) or 'none'}."
        )
    return chosen[0]


def export_model(
    study: Study,
    storage_url: str,
    tracker: MlflowTracker,
    out: Path,
    number: int | None = None,
) -> dict[str, Any]:
    """Write the chosen trial's complete model to ``out``; return what was written."""
    out = Path(out)
    _check_output(out)
    trial = find_trial(study, storage_url, number)
    run_id = trial.run_id
    if not run_id:
        raise ExportError(f"Trial {trial.number} has no MLflow run id: it cannot be exported.")
    from searchlab import training as trial_mod
    from searchlab.data import DataInfo, classes_from_tag
    from searchlab.store import redact
    from searchlab.tracking import MissingRun

    try:
        tags = tracker.run_tags(run_id)
    except MissingRun as exc:
        raise ExportError(
            f"Trial {trial.number}'s MLflow run {run_id} is not in {redact(tracker.uri)}: pass the "
            f"--tracking-uri the study ran with. ({type(exc).__name__})"
        ) from exc
    except StoreError:
        raise
    except Exception as exc:
        raise ExportError(
            f"Trial {trial.number}'s MLflow run {run_id} is not in {redact(tracker.uri)}: pass the "
            f"--tracking-uri the study ran with. ({type(exc).__name__})"
        ) from exc
    info = DataInfo(
        input_shape=tuple(int(v) for v in tags["searchlab.input_shape"].split(",")),
        num_classes=classes_from_tag(tags.get("searchlab.num_classes")),
    )
    with tempfile.TemporaryDirectory(prefix="searchlab-export-") as tmp:
        try:
            weights = trial_mod.weights_file(tracker.download(run_id, "weights", Path(tmp)))
        except Exception as exc:
            raise ExportError(
                f"Trial {trial.number}'s weights are missing from MLflow run {run_id} ({exc})."
            ) from exc
        model = trial_mod.load_trained(study.model, trial.params, info, weights)
        _save(model, out)
    names = tags.get("searchlab.class_names")
    written = {}
    if names:  # an image folder's classes: predicted class id i is names[i]
        beside = out.with_name(out.stem + CLASS_NAMES_SUFFIX)
        try:
            beside.write_text(names + "\n", encoding="utf-8")
        except OSError as exc:
            raise ExportError(f"Cannot write {beside}: {exc.strerror or exc}.") from exc
        written["class_names"] = str(beside)
    return {
        "path": str(out),
        **written,
        "trial": trial.number,
        "value": trial.value,
        "run_id": run_id,
        "params": dict(trial.params),
    }


def _check_output(out: Path) -> None:
    if out.suffix not in FORMATS:
        raise ExportError(f"Cannot export to {out}: the file name must end in .h5 or .keras.")
    folder = out.parent
    if not folder.is_dir():
        raise ExportError(
            f"Cannot export to {out}: folder {folder} does not exist. Create it first, or "
            "pass another -o."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(
            f"Cannot export to {out}: folder {folder} cannot be written (read-only or not "
            "yours). Pass an -o in a folder you may write to."
        )


def _save(model: Any, out: Path) -> None:
    from searchlab import training as trial_mod

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Keras calls HDF5 "legacy"; the user asked for it
    # whole or not at all: saved beside ``out`` (same suffix: it picks the format), renamed
    partial = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        trial_mod.ensure_space(partial, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(partial)
        os.replace(partial, out)
    except OSError as exc:
        raise ExportError(
            f"Cannot write {out}: {exc.strerror or exc}. Free some space, or pass an -o "
            "on another disk."
        ) from exc
    finally:
        absl.setLevel(level)
        partial.unlink(missing_ok=True)


def export_logged(model_uri: str, tracker: MlflowTracker, out: Path) -> dict[str, Any]:
    """Write the Keras model of the MLflow Model ``model_uri`` (``models:/NAME@champion``,
    ``models:/NAME/3``, ``models:/<id>``) to ``out``; return what was written."""
    out = Path(out)
    _check_output(out)
    from searchlab.store import redact

    tracker.connect()
    with tempfile.TemporaryDirectory(prefix="searchlab-export-") as tmp:
        try:
            model = tracker.load_keras_model(model_uri, Path(tmp))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = hide_password(first, tracker.uri)
            raise ExportError(
                f"Cannot load the MLflow model {model_uri} from {redact(tracker.uri)} ({first}). Check "
                "the name, version or alias (searchlab run --register NAME registers one), or "
                "pass the --tracking-uri it was registered in."
            ) from exc
        _save(model, out)
    return {"path": str(out), "model_uri": model_uri}
