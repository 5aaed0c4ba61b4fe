"""A HyperModel's own ``fit``, called as KerasTuner's ``Tuner.run_trial`` calls it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from searchlab.errors import StudyDefinitionError
from searchlab.hp import DEFAULT_OBJECTIVE, UnnamedObjective
from searchlab.training.monitor import Monitor
from searchlab.training.spec import TrialSpec

#: keyword arguments of searchlab's that a HyperModel's fit may pass to model.fit itself
#: (``epochs=hp.Int("epochs", ...)`` as in KerasTuner's docs): its own value is used
_OURS_TO_DROP = ("batch_size", "epochs", "validation_data", "verbose")


def user_fit(
    model: Any, params: Mapping[str, Any], spec: TrialSpec, monitor: Monitor, batch_size: int
) -> None:
    """Train through the HyperModel's own ``fit``, as KerasTuner's ``Tuner.run_trial`` calls
    it: the data as positional arguments, the rest (with the monitor in ``callbacks``) as
    keyword arguments; then take the objective from what it returned where no epoch
    reported it."""
    assert spec.fit is not None
    data = spec.data
    if data.streamed:  # KerasTuner's fit(hp, model, x, y, ...) takes arrays
        raise StudyDefinitionError(
            "The HyperModel's own fit takes arrays, but these images stream from disk (their "
            "decoded size is above the memory bound): raise Dataset(memory_mb=...) or "
            "$SEARCHLAB_DATA_MEMORY_MB, or let searchlab fit the model (drop fit)."
        )
    kwargs: dict[str, Any] = {
        "validation_data": (data.x_val, data.y_val),
        "epochs": spec.epochs,
        "batch_size": batch_size,
        "callbacks": [monitor],
        "verbose": 0,
    }
    monitor.strict = False
    while True:
        try:
            returned = spec.fit(params, model, data.x_train, data.y_train, **kwargs)
            break
        except TypeError as exc:
            match = re.search(r"got multiple values for keyword argument '(\w+)'", str(exc))
            if match is None or monitor.history:
                raise
            name = match.group(1)
            if name in _OURS_TO_DROP and name in kwargs:
                del kwargs[name]  # fit sets it itself (e.g. batch_size=hp.Choice(...))
                continue
            raise StudyDefinitionError(
                f"HyperModel.fit passes {name}= to model.fit and so does searchlab, in kwargs "
                f"(as KerasTuner does): take it from kwargs instead (e.g. "
                f"kwargs['{name}'] for callbacks, adding yours to the list)."
            ) from None
    if monitor.bad_loss or spec.objective in monitor.history:
        return
    _returned_metrics(returned, spec, monitor)


def _returned_metrics(returned: Any, spec: TrialSpec, monitor: Monitor) -> None:
    """What a HyperModel's fit returned, as KerasTuner reads it: a ``History`` (per epoch), a
    dict of metrics or a number (the objective).  Its epochs are logged after the fact and
    the model's final weights are kept."""
    history = getattr(returned, "history", None)
    if isinstance(history, Mapping) and history:
        epochs = max(len(v) for v in history.values())
        per_epoch = [
            {k: float(v[i]) for k, v in history.items() if i < len(v)} for i in range(epochs)
        ]
    elif isinstance(returned, Mapping):
        per_epoch = [{str(k): float(v) for k, v in returned.items()}]
    elif isinstance(returned, int | float | np.number) and not isinstance(returned, bool):
        if isinstance(spec.objective, UnnamedObjective):  # never maximise it as val_accuracy
            raise StudyDefinitionError(
                f"HyperModel.fit returned one number ({float(returned):.6g}) and the study "
                f"names no objective: searchlab cannot tell whether to maximise or minimise "
                f"it. Give objective='{DEFAULT_OBJECTIVE}', direction='minimize' (KerasTuner's "
                f"default) or direction='maximize'."
            )
        per_epoch = [{spec.objective: float(returned)}]
    else:
        raise StudyDefinitionError(
            f"HyperModel.fit returned {type(returned).__name__} and no epoch reported "
            f"{spec.objective!r} to the callbacks in kwargs: return model.fit(...)'s History, a "
            f"dict of metrics or the objective's value, as KerasTuner requires."
        )
    if not any(spec.objective in logs for logs in per_epoch):
        names = sorted({k for logs in per_epoch for k in logs})
        raise StudyDefinitionError(
            f"HyperModel.fit returned {', '.join(names) or 'nothing'} but not the objective "
            f"{spec.objective!r}: return it, or set objective= to one of them."
        )
    first = len(monitor.history.get("loss", [])) if monitor.history else 0
    for offset, logs in enumerate(per_epoch):
        monitor.record(first + offset if len(per_epoch) > 1 else max(first - 1, 0), logs)
    if monitor.best is not None and monitor.best_weights is None:
        monitor.copy_best()
