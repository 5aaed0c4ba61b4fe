"""What ``searchlab.keras_tuner``'s tuners lean on: the error for an unsupported
argument, ``search()``'s data as a ``Dataset`` loader, KerasTuner's compile overrides and
Hyperband budget, and the best trials' models rebuilt."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from searchlab.errors import SearchlabError


class UnsupportedArgument(SearchlabError, ValueError):
    """A KerasTuner argument searchlab does not support (the message says what to do)."""


def recompile(model: Any, overrides: Mapping[str, Any]) -> None:
    """Compile ``model`` again with KerasTuner's ``optimizer=`` / ``loss=`` / ``metrics=`` in
    place of its builder's (as KerasTuner's ``Tuner`` does)."""
    config = model.get_compile_config() or {}
    import keras

    def kept(name: str) -> Any:
        value = config.get(name)
        return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else value

    model.compile(
        optimizer=overrides.get("optimizer") or model.optimizer,
        loss=overrides.get("loss") or kept("loss") or model.loss,
        metrics=overrides.get("metrics") or kept("metrics"),
    )


def hyperband_trials(max_epochs: int, factor: int, iterations: int) -> int:
    """How many configurations KerasTuner's Hyperband tries: per iteration, bracket s of
    ``s_max = floor(log_factor(max_epochs))`` starts ``ceil((s_max + 1) / (s + 1) * factor**s)``."""
    s_max = int(math.log(max_epochs) / math.log(factor) + 1e-9) if max_epochs > 1 else 0
    per = sum(math.ceil((s_max + 1) / (s + 1) * factor**s) for s in range(s_max + 1))
    return per * iterations


def _trained(spec: Any, params: Mapping[str, Any], weights: Path) -> Any:
    """A trial's model with its saved weights.  A ``keras.Sequential()`` without an ``Input``
    comes back as its builder returned it: its layers built and loaded, the model itself
    without an input layer yet, so the user may ``build(input_shape=...)`` it, as
    KerasTuner's guide does."""
    import keras

    from searchlab.data import info_of
    from searchlab.training import load_trained

    fresh = spec.build(dict(params))
    model = load_trained(spec.build, params, info_of(spec.data), weights)
    if fresh.built or not isinstance(model, keras.Sequential):
        return model
    unbuilt = keras.Sequential(model.layers, name=model.name)
    config = model.get_compile_config()
    if config:
        unbuilt.compile_from_config(config)
    return unbuilt


def _refuse(unsupported: Mapping[str, Any], retries: int) -> None:
    """One line for an argument searchlab does not take, saying what to do instead."""
    instead = {
        "distribution_strategy": "run one searchlab worker per GPU (searchlab run --gpus)",
        "logger": "drop it: every trial is an MLflow run (searchlab ui)",
        "tuner_id": "drop it: searchlab names each worker itself",
        "oracle": "use RandomSearch, GridSearch, BayesianOptimization or Hyperband",
    }
    for name in unsupported:
        what = instead.get(name, "drop it")
        raise UnsupportedArgument(f"searchlab.keras_tuner does not take {name}=: {what}.")
    if retries:
        raise UnsupportedArgument(
            f"max_retries_per_trial={retries}: searchlab does not retry a failed trial (a "
            "crashed one is resumed from its last epoch); drop it, and use "
            "max_consecutive_failed_trials= for how many failures in a row stop the search."
        )


def _override_params(given: Any) -> Any:
    from searchlab.study import _override_params as parse

    return parse(given)


def _loader(x: Any, y: Any, validation_data: Any, validation_split: float | None) -> Any:
    """The ``Dataset`` loader of ``search()``'s data: arrays (``validation_data`` a pair, or
    ``validation_split`` of the training arrays' last rows, as ``model.fit`` takes them), or
    a ``tf.data.Dataset`` / ``keras.utils.PyDataset`` of ``(x, y)`` (and one to validate on)."""
    if y is None:  # a dataset of (x, y) batches
        if validation_split:
            raise UnsupportedArgument(
                "search(dataset, validation_split=): model.fit takes validation_split with "
                "arrays only; pass validation_data=<a dataset> instead."
            )
        return (lambda: (x, validation_data)) if validation_data is not None else (lambda: x)
    if validation_data is not None:
        if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
            raise UnsupportedArgument(
                "search(validation_data=) takes a pair (x_val, y_val) with arrays (sample "
                "weights are not supported)."
            )
        x_val, y_val = validation_data
        return lambda: (x, y, x_val, y_val)
    if validation_split:
        return lambda: (x, y, x[:0], y[:0])
    return lambda: (x, y, x, y)  # no validation: the training data stands in, as metrics go
