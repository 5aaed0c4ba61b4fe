"""Any compiled model: find its frozen prefix automatically (``auto_cut``) and compile the
part after it as the model was."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from searchlab.data import Data
from searchlab.training.cache.features import MEMORY_ENV, FeatureCache
from searchlab.training.cache.fingerprint import graph_digest, prefix_fingerprint, prefix_key
from searchlab.training.cache.graph import (
    Cut,
    NoCut,
    Reason,
    cut_points,
    graph_of,
    is_frozen,
    plan_cut,
    why_no_cut,
)
from searchlab.training.cache.pools import POOLS


@dataclass(frozen=True)
class AutoCut:
    """Where ``auto_cut`` cuts a study's own model: ``graph`` (the model itself, or a
    functional graph of a ``Sequential``'s layers) after ``cut``; ``fingerprint`` as
    ``prefix_fingerprint(graph, cut)``, ``key`` the features' cache key, ``compile_args``
    what the part after the cut is compiled with (``compile_like``)."""

    graph: keras.Model
    cut: Cut
    fingerprint: str
    key: str
    compile_args: dict[str, Any]


def _compile_args(model: keras.Model) -> dict[str, Any]:
    """What ``model`` was compiled with, to compile its part after a cut alike (its own
    optimizer object: not built yet, it builds on the part's variables, the same ones)."""
    config = model.get_compile_config()
    if not config:
        raise ValueError("the model is not compiled")
    args = dict(keras.saving.deserialize_keras_object(config))
    args["optimizer"] = model.optimizer
    return args


def compile_like(part: keras.Model, cut: AutoCut) -> None:
    """Compile ``part`` (``suffix_model(cut.graph, cut.cut)``) as its model was compiled."""
    part.compile(**cut.compile_args)


def auto_cut(
    model: keras.Model,
    data: Data,
    store: FeatureCache,
    input_shape: tuple[int, ...] | None = None,
    scope: Hashable = None,
) -> AutoCut | NoCut:
    """Where a study's own compiled model can train on cached features: the deepest cut with
    everything before it frozen and deterministic, at least one frozen layer with weights
    among it, taking the raw input, whose features fit the memory bound and whose frozen
    weights are the same from trial to trial in this process (among trials of one
    ``scope``: the trial's ``backbone_seed``); else why not."""
    graph = graph_of(model, input_shape)
    if graph is None:
        return NoCut(
            Reason.NOT_A_GRAPH,
            f"a subclassed model ({type(model).__name__}) has no layer graph to cut; build it "
            "with keras.Sequential or the functional API to use the cache",
        )
    if len(graph.inputs) != 1:
        return NoCut(Reason.NOT_A_GRAPH, f"the model takes {len(graph.inputs)} inputs, not one")
    cut = plan_cut(graph, cut_points(graph))
    if cut is None:
        return why_no_cut(graph)
    if not any(is_frozen(layer) for layer in graph.layers[1 : cut.index + 1]):
        return why_no_cut(graph)
    if not store.fits(cut, data):
        mb = int(np.prod(cut.shape)) * 4 * (len(data.x_train) + len(data.x_val)) >> 20
        return NoCut(
            Reason.TOO_LARGE,
            f"{cut.name}'s output for the data takes {mb} MB, more than "
            f"${MEMORY_ENV}={store.memory_bytes >> 20}; raise it or cut after a smaller layer",
        )
    ops_digest = graph_digest(graph, cut)
    digest = hashlib.sha1(repr((ops_digest, scope)).encode()).hexdigest()
    weights_differ = NoCut(
        Reason.RANDOM_WEIGHTS,
        "the frozen layers are initialised anew in each trial (weights=None?); set "
        "Study(backbone_seed=...) to build them from one seed, or load weights",
    )
    if digest in POOLS.random_prefixes:
        return weights_differ
    fingerprint = prefix_fingerprint(graph, cut)
    seen = POOLS.seen_prefixes.get(digest)
    if seen is not None and seen != fingerprint:
        POOLS.random_prefixes.add(digest)
        return weights_differ
    POOLS.seen_prefixes[digest] = fingerprint
    POOLS.seen_prefixes.move_to_end(digest)
    while len(POOLS.seen_prefixes) > 64:
        POOLS.seen_prefixes.popitem(last=False)
    try:
        args = _compile_args(model)
    except Exception as exc:  # a custom loss or metric Keras cannot deserialize
        return NoCut(
            Reason.NOT_RECOMPILABLE,
            f"{type(exc).__name__}: {exc}; register custom losses and metrics with "
            "keras.saving.register_keras_serializable",
        )
    key = prefix_key(graph, cut, data, f"{fingerprint}:{ops_digest}", name="auto")
    return AutoCut(graph, cut, fingerprint, key, args)
