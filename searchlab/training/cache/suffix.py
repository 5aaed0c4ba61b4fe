"""A transfer trial's suffix: one compiled suffix for many trials (a small pool), its
weights file (``save_suffix`` / ``load_suffix``), and the steps run per backend call."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab.errors import StudyDefinitionError
from searchlab.training.cache.builder import FeaturePlan, TransferBuilder
from searchlab.training.cache.fingerprint import prefix_fingerprint
from searchlab.training.cache.graph import Cut, graph_of
from searchlab.training.cache.pools import POOLS

#: training steps a model on cached features runs per call into the backend (Keras's
#: ``steps_per_execution``): such a step is a few small matrix products, and one call per
#: step costs more than the step (measured on a 2-core CPU, TensorFlow, VGG16 features, a
#: 256-wide head, batch 32: 0.98 s for two epochs one step per call, 0.50 s with 32); on
#: TensorFlow ``backend.fit_arrays`` makes its calls this many steps long too
STEPS_PER_EXECUTION = 32


def run_steps_together(model: keras.Model) -> None:
    """Let a compiled model that trains on cached features run ``STEPS_PER_EXECUTION``
    steps per call (the same steps, batches and results; callbacks see every 32nd batch),
    unless its compile asked for more."""
    if model.steps_per_execution < STEPS_PER_EXECUTION:
        model.steps_per_execution = STEPS_PER_EXECUTION


# -- one compiled suffix for many trials ---------------------------------------------------

SUFFIX_POOL_SIZE = 4
SUFFIX_POOL_MB = 128


@dataclass
class Suffix:
    """A cached trial's model: the builder's suffix from the plan's base cut, and per phase the
    compiled model that trains on that phase's features (the suffix itself, or its end).

    For each phase the trial calls ``phase_model``, then, on a new suffix, compiles that model,
    builds its optimizer and calls ``record``; on a ``reused`` one it calls ``restart`` instead
    (the compiled model, and so its traced steps, is the same).  ``keep_suffix`` gives it back
    once its fit ended.
    """

    key: tuple | None  # None: the pool cannot take it
    model: keras.Model
    reused: bool = False
    phases: dict[int, keras.Model] = field(default_factory=dict)
    #: per phase: its optimizer's variables before its first step (None: zeros)
    starts: dict[int, list[np.ndarray | None]] = field(default_factory=dict)

    def phase_model(self, plan: FeaturePlan, phase: int) -> keras.Model:
        if phase not in self.phases:
            self.phases[phase] = plan.train_model(self.model, plan.cuts[phase])
        return self.phases[phase]

    def record(self, phase: int) -> None:
        """Remember where the compiled phase model's optimizer starts, for ``restart``."""
        train = self.phases[phase]
        optimizer = train.optimizer
        if optimizer is None:
            self.key = None
            return
        if not optimizer.built:  # as fit builds it (JAX: before its first step, not here yet)
            optimizer.build(train.trainable_variables)
        self.starts[phase] = optimizer_starts(optimizer)

    def restart(self, phase: int, learning_rate: float) -> None:
        """Put the phase model's optimizer (steps, moments, learning rate) and metrics where
        they were before its first step, with ``learning_rate``."""
        train = self.phases[phase]
        optimizer = train.optimizer
        restart_optimizer(optimizer, self.starts[phase])
        optimizer.learning_rate = learning_rate
        train.reset_metrics()

    @property
    def nbytes(self) -> int:
        variables = {id(v): v for v in self.model.variables}
        for train in self.phases.values():
            if train.optimizer is not None:
                variables.update((id(v), v) for v in train.optimizer.variables)
        return sum(int(np.prod(v.shape)) * _itemsize(v.dtype) for v in variables.values())


def optimizer_starts(optimizer: Any) -> list[np.ndarray | None]:
    """A built optimizer's variables before its first step (None: zeros), for
    ``restart_optimizer``."""
    return [
        value if value.any() else None
        for value in (np.asarray(keras.ops.convert_to_numpy(v)) for v in optimizer.variables)
    ]


def restart_optimizer(optimizer: Any, starts: list[np.ndarray | None]) -> None:
    """Put ``optimizer``'s steps and moments back where ``optimizer_starts`` found them."""
    for variable, start in zip(optimizer.variables, starts, strict=True):
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype) if start is None else start)


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # bfloat16, which NumPy does not name
        return 2


def _suffix_key(
    build: TransferBuilder, params: Mapping[str, Any], info: Any, plan: FeaturePlan
) -> tuple | None:
    indices = [cut.index for cut in plan.cuts]
    if len(set(indices)) < len(indices):  # two phases would compile one model, each anew
        return None
    own = build.suffix_key(params, info, plan.template.model, plan.base)
    if own is None:
        return None
    frozen = tuple(f for _, f, _ in plan.phases)
    return (own, tuple(indices), frozen, keras.config.dtype_policy().name, keras.backend.backend())


def training_suffix(
    build: TransferBuilder, params: Mapping[str, Any], info: Any, plan: FeaturePlan
) -> Suffix:
    """The suffix a trial of ``plan`` trains: a pooled one of the same structure, reset to
    where a new one starts (the builder draws the same seeds), else a new one."""
    key = _suffix_key(build, params, info, plan)
    found = POOLS.suffixes.pop(key, None) if key is not None else None
    if found is None:
        return Suffix(key, build.build_suffix(params, info, plan.template.model, plan.base))
    build.reset_suffix(found.model, params, plan.template.model)
    found.reused = True
    return found


def keep_suffix(suffix: Suffix) -> None:
    """Give back a suffix whose fit ended (its trial complete, pruned or failed on a NaN
    loss: ``training_suffix`` resets every variable) for a later trial to reuse."""
    if suffix.key is None or len(suffix.starts) < len(suffix.phases):
        return
    POOLS.suffixes[suffix.key] = suffix
    POOLS.suffixes.move_to_end(suffix.key)
    budget = SUFFIX_POOL_MB << 20
    while len(POOLS.suffixes) > 1 and (
        len(POOLS.suffixes) > SUFFIX_POOL_SIZE
        or sum(x.nbytes for x in POOLS.suffixes.values()) > budget
    ):
        POOLS.suffixes.popitem(last=False)


SUFFIX_FORMAT = "searchlab-suffix-weights"


def save_suffix(model: keras.Model, path: Path, cut: Cut, fingerprint: str) -> None:
    """Save the weights of ``model`` (a suffix from ``cut``) with the fingerprint of the
    frozen prefix it was trained on: with the builder, that is the complete model."""
    names: list[list[Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        weights = layer.get_weights()
        for i, w in enumerate(weights):
            arrays[f"w{len(names)}_{i}"] = w
        names.append([layer.name, len(weights)])
    meta = {
        "format": SUFFIX_FORMAT,
        "version": 1,
        "cut": cut.name,
        "cut_index": cut.index,
        "prefix_fingerprint": fingerprint,
        "layers": names,
    }
    # numpy's stubs read **arrays as its allow_pickle keyword
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]


def load_suffix(model: keras.Model, path: Path) -> None:
    """Load a ``save_suffix`` file into ``model``, the complete model built by the same
    builder; its prefix must have the fingerprint the trial was trained on."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != SUFFIX_FORMAT:
            raise StudyDefinitionError(f"{path} is not a searchlab suffix-weights file.")
        model = graph_of(model) or model  # a Sequential's cut is in its graph (auto_cut)
        names = [layer.name for layer in model.layers]
        if meta["cut"] not in names:
            raise StudyDefinitionError(
                f"The trial's weights start after layer {meta['cut']!r}, which the study's "
                f"model no longer has; it has {', '.join(names)}. Run the study again."
            )
        cut = Cut(names.index(meta["cut"]), meta["cut"], ())
        found = prefix_fingerprint(model, cut)
        if found != meta["prefix_fingerprint"]:
            raise StudyDefinitionError(
                f"The trial was trained on a frozen prefix (up to {cut.name!r}) with "
                f"fingerprint {meta['prefix_fingerprint']}, but the study now builds one with "
                f"fingerprint {found}: its backbone weights, input size or preprocessing "
                "changed since the trial ran. Restore them, or run the study again."
            )
        stored = {name for name, _ in meta["layers"]}
        missing = [
            layer.name
            for layer in model.layers[cut.index + 1 :]
            if layer.weights and layer.name not in stored
        ]
        if missing:
            raise StudyDefinitionError(
                f"The trial's weights lack layers {', '.join(missing)} of the study's model: "
                "its head changed since the trial ran. Run the study again."
            )
        for j, (name, n) in enumerate(meta["layers"]):
            model.get_layer(name).set_weights([f[f"w{j}_{i}"] for i in range(n)])
