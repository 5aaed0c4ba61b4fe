"""One compiled twin of a hand-written model's part after a cut, for many trials: its
dropout rates and learning rate in variables, so one traced step serves them all."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from searchlab import backend
from searchlab.training.cache.pools import POOLS
from searchlab.training.cache.suffix import SUFFIX_POOL_SIZE, optimizer_starts, restart_optimizer

log = logging.getLogger("searchlab.cache")  # the name log lines and configs know


# -- one compiled twin of a hand-written model's part for many trials ----------------------


class RateDropout(keras.layers.Layer):
    """A twin's ``Dropout`` (``twin_for``): the same layer, its rate read from variables set
    per trial (``set_rate``), so one traced training step serves every rate; the same masks
    and scaling as ``Dropout``'s for the same seed state (``backend.dropout_at``)."""

    def __init__(
        self, rate: float, noise_shape: Any = None, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.rate, self.noise_shape, self.seed = float(rate), noise_shape, seed
        self.seed_generator = keras.random.SeedGenerator(seed)  # Dropout(0) has none: it may
        self.supports_masking = True
        self.held: _Held | None = None

    def build(self, input_shape: Any) -> None:
        # the layer's own variables (JAX's traced step takes them as inputs; constants else)
        self.held = _Held(
            *(
                self.add_weight(shape=(), initializer="zeros", trainable=False, name=name)
                for name in ("rate", "keep", "scale")
            )
        )
        self.set_rate(self.rate)

    def set_rate(self, rate: float) -> None:
        self.rate = float(rate)
        if self.held is not None:  # as the backends compute them from a Python rate
            self.held.rate.assign(self.rate)
            self.held.keep.assign(1.0 - self.rate)
            self.held.scale.assign(1.0 / (1.0 - self.rate))

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training or self.held is None:
            return inputs
        held = self.held
        return backend.dropout_at(
            inputs, held.rate, held.keep, held.scale, self.noise_shape, self.seed_generator
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(rate=self.rate, noise_shape=self.noise_shape, seed=self.seed)
        return config


class _Held:
    def __init__(self, rate: Any, keep: Any, scale: Any) -> None:
        self.rate, self.keep, self.scale = rate, keep, scale


@dataclass
class Twin:
    """A compiled copy of a model's part after a cut (``suffix_model``), trained in place of
    that part: its layers are new ones of the same configs (``Dropout``: ``RateDropout``), its
    optimizer a new one of the same config, so the train and test steps traced for one trial
    serve every later trial with the same structure, whatever its dropout rates and learning
    rate.  ``take`` puts the part's variables into it (weights, random-stream states, rates,
    learning rate; the optimizer and metrics as new), ``give`` puts its variables back."""

    key: str
    model: keras.Model
    #: per layer of the part (the input aside): the twin's layer
    layers: list[Any]
    #: the learning rate is a number (set per trial), not a schedule (the same in the key)
    constant_rate: bool = True
    reused: bool = False
    #: the optimizer's variables before its first step (None: zeros), once built
    starts: list[np.ndarray | None] | None = None

    def pairs(self, part: keras.Model) -> list[tuple[Any, Any]]:
        """(twin variable, part variable) for every layer's variables, in order (a
        ``Dropout``'s: its random stream's state; a ``Dropout(0)`` has none to give, and its
        twin's draws keep every value)."""
        own = _own_layers(part)
        pairs = []
        for twin_layer, layer in zip(self.layers, own, strict=True):
            if isinstance(twin_layer, RateDropout):  # its rate variables are set per trial
                if getattr(layer, "seed_generator", None) is not None:
                    pairs.append((twin_layer.seed_generator.state, layer.seed_generator.state))
                continue
            pairs.extend(zip(twin_layer.variables, layer.variables, strict=True))
        return pairs

    def take(self, part: keras.Model, optimizer: Any) -> None:
        """Start as ``part`` starts (compiled with ``optimizer``)."""
        own = _own_layers(part)
        for mine, theirs in self.pairs(part):
            mine.assign(theirs)
        for twin_layer, layer in zip(self.layers, own, strict=True):
            if isinstance(twin_layer, RateDropout):
                twin_layer.set_rate(layer.rate)
        train = self.model
        if self.starts is not None:
            restart_optimizer(train.optimizer, self.starts)
        if self.constant_rate:  # else the same schedule, in the key
            train.optimizer.learning_rate = float(
                keras.ops.convert_to_numpy(optimizer.learning_rate)
            )
        train.reset_metrics()

    def record(self) -> None:
        """The twin is built for fit: remember where its optimizer starts."""
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.starts = optimizer_starts(optimizer)

    def give(self, part: keras.Model) -> None:
        """Put the twin's variables (trained weights, random-stream states) into ``part``."""
        for mine, theirs in self.pairs(part):
            theirs.assign(mine)


def _own_layers(model: keras.Model) -> list[Any]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def twin_key(part: keras.Model, model: keras.Model) -> str | None:
    """The structure of ``part`` (``suffix_model`` of ``model``) and of ``model``'s compile
    arguments, without what a twin takes per trial: layer names, ``Dropout`` rates, a
    constant learning rate.  None where a twin cannot stand in (a learning-rate schedule is
    fine, an optimizer or compile config Keras cannot write is not)."""
    try:
        names = {part.name: "@model"}
        stack = list(reversed(part.layers))
        while stack:  # every layer's name, nested ones too, by its place
            layer = stack.pop()
            names.setdefault(layer.name, f"@{len(names)}")
            stack.extend(reversed(getattr(layer, "layers", [])))

        def scrub(value: Any) -> Any:
            if isinstance(value, dict):  # names not in the map (a nested input's): dropped
                return {
                    k: None if k == "name" and v not in names else scrub(v)
                    for k, v in value.items()
                }
            if isinstance(value, list | tuple):
                return [scrub(v) for v in value]
            return names.get(value, value) if isinstance(value, str) else value

        structure = part.get_config()
        for entry in structure["layers"]:  # the part's own layers: _twin_layer's (not nested)
            config = entry["config"]
            if entry["class_name"] == "Dropout" and entry.get("module") == "keras.layers":
                if not 0 <= config["rate"] < 1:  # 1 drops everything: no twin
                    raise ValueError(f"Dropout rate {config['rate']}")
                entry["config"] = {**config, "rate": None}

        optimizer = keras.optimizers.serialize(model.optimizer)
        if optimizer["config"].get("use_ema"):  # its averages start from the weights
            return None
        optimizer["config"].pop("name", None)  # adam, adam_1, ...
        if not isinstance(optimizer["config"].get("learning_rate"), dict):
            optimizer["config"]["learning_rate"] = None
        compiled = dict(model.get_compile_config())
        compiled.pop("optimizer", None)
        described = [
            scrub(structure),
            optimizer,
            compiled,
            keras.config.dtype_policy().name,
            keras.backend.backend(),
        ]
        return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()
    except Exception as exc:  # a config Keras cannot write: no twin, the part trains
        log.debug("no twin for %s: %r", part.name, exc)
        return None


def twin_for(part: keras.Model, model: keras.Model, compile_args: dict[str, Any]) -> Twin | None:
    """A twin of ``part`` (``suffix_model`` of the compiled ``model``) that an earlier trial
    gave back, else a new one compiled as ``model`` was; None where none can be made."""
    key = twin_key(part, model) if backend.name() in backend.DROPOUT_AT else None
    if key is None:
        return None
    found = POOLS.twins.pop(key, None)
    if found is not None:
        found.reused = True
        return found
    import random

    state = random.getstate(), np.random.get_state()  # new layers draw seeds: not the trial's
    try:
        twin = keras.models.clone_model(part, clone_function=_twin_layer)
        args = dict(compile_args)
        args["optimizer"] = keras.optimizers.deserialize(
            keras.optimizers.serialize(model.optimizer)
        )
        twin.compile(**args)
        own = _own_layers(twin)
        rate = keras.optimizers.serialize(model.optimizer)["config"].get("learning_rate")
        made = Twin(key, twin, own, constant_rate=not isinstance(rate, dict))
        for mine, theirs in made.pairs(part):
            if tuple(mine.shape) != tuple(theirs.shape):
                raise ValueError(f"{mine.path} {mine.shape} is not {theirs.path} {theirs.shape}")
    except Exception as exc:  # a layer that cannot be cloned from its config: no twin
        log.debug("no twin for %s: %r", part.name, exc)
        return None
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    return made


def _twin_layer(layer: Any) -> Any:
    config = layer.get_config()
    if type(layer) is keras.layers.Dropout:
        return RateDropout.from_config(config)
    return type(layer).from_config(config)


def keep_twin(twin: Twin) -> None:
    """Give back a twin whose fit ended, for a later trial of the same structure."""
    if twin.starts is None:  # never built for fit
        return
    POOLS.twins[twin.key] = twin
    POOLS.twins.move_to_end(twin.key)
    while len(POOLS.twins) > SUFFIX_POOL_SIZE:
        POOLS.twins.popitem(last=False)
