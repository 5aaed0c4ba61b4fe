"""Rebuild a trained trial's complete model from its params and weights file."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras

from searchlab.data import DataInfo
from searchlab.training import cache
from searchlab.training.build import build_model
from searchlab.training.spec import weights_file


def load_trained(
    build: Callable[..., Any], params: Mapping[str, Any], info: DataInfo, weights: Path
) -> Any:
    """Rebuild a trial's complete model from its params and load its saved best weights:
    ``weights`` is either weights file (or the folder holding it).  A suffix file is checked
    against the rebuilt model's frozen prefix (``cache.load_suffix``)."""
    weights = weights_file(weights)
    keras.backend.clear_session()
    model = build_model(build, params, info, compiled=False)  # weights only: no training
    if not model.built:  # keras.Sequential() without an Input (KerasTuner's guide) builds on fit
        model.build((None, *info.input_shape))
    if weights.name.endswith(".npz"):
        cache.load_suffix(model, weights)
        return model
    with warnings.catch_warnings():
        # The file also holds the trained optimizer's slots; a fresh model's optimizer has
        # none yet, which Keras reports. Only the model's weights matter here.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(weights)
    return model
