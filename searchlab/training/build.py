"""Call a study's builder and check what it returned."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from searchlab.data import DataInfo
from searchlab.errors import StudyDefinitionError, TrialFailed
from searchlab.hp import SPLIT_OBJECTIVE

#: where Keras 2 keeps its models: ``tf_keras`` (``TF_USE_LEGACY_KERAS=1``), TensorFlow's copy
_KERAS_2 = ("tf_keras", "tensorflow.python.keras", "keras.engine", "keras.src.engine")


def build_model(
    build: Callable[..., Any],
    params: Mapping[str, Any],
    info: DataInfo,
    *,
    compiled: bool = True,
) -> Any:
    """Call a study's builder as ``build(params)`` or ``build(params, info)``; ``compiled``:
    refuse a model that is not compiled (a HyperModel's own ``fit`` may train one that is
    not)."""
    try:
        n_args = len(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        n_args = 1
    model = build(dict(params), info) if n_args >= 2 else build(dict(params))
    check_model(model, compiled=compiled)
    return model


def check_model(model: Any, *, compiled: bool = True) -> None:
    """Refuse in one line what a builder returned that searchlab cannot train."""
    if not isinstance(model, keras.Model):
        module = type(model).__module__
        if module.startswith(_KERAS_2):
            raise StudyDefinitionError(
                f"The model builder returned a Keras 2 model ({module}.{type(model).__name__}: "
                "tf_keras, or TF_USE_LEGACY_KERAS=1); searchlab needs Keras 3. Build it with "
                "`import keras` (Keras 3) and unset TF_USE_LEGACY_KERAS."
            )
        if isinstance(model, int | float | np.number) and not isinstance(model, bool):
            raise StudyDefinitionError(
                "The model builder returned a number, as an Optuna objective(trial) does. "
                f"{SPLIT_OBJECTIVE}."
            )
        raise StudyDefinitionError(
            f"The model builder must return a keras.Model, but returned {type(model).__name__}."
        )
    if compiled and getattr(model, "optimizer", None) is None:
        raise StudyDefinitionError(
            "The model builder returned a model that is not compiled: call "
            "model.compile(optimizer=..., loss=..., metrics=['accuracy']) before returning it."
        )


def check_size(model: Any, info: DataInfo, limit: int) -> None:
    """KerasTuner's ``max_model_size``: a model with more parameters fails its trial."""
    if not model.built:  # keras.Sequential() without an Input builds on fit
        model.build((None, *info.input_shape))
    size = int(model.count_params())
    if size > limit:
        raise TrialFailed(
            f"the model has {size:,} parameters, more than max_model_size={limit:,}: not trained"
        )
