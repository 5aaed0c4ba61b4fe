"""Where a model can be cut: the frozen, deterministic prefix of a layer graph, the part after
it, and why a model has no such cut."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import keras

from searchlab.backend import is_random
from searchlab.outcome import CACHE_DISABLED, CACHE_NO_FROZEN


@dataclass(frozen=True)
class Cut:
    """Cut a model after ``layers[index]`` (``name``), whose output in the model's graph is
    ``tensor`` with per-example ``shape``."""

    index: int
    name: str
    shape: tuple[int, ...]
    tensor: Any = None


def cache_safe(layer: Any) -> bool:
    """Whether ``layer`` gives the same output for the same input in training: no trainable
    weights and no randomness (Dropout, noise, augmentation)."""
    if isinstance(layer, keras.layers.InputLayer):
        return True
    return not layer.trainable_weights and not is_random(layer)


def _own_nodes(model: keras.Model) -> dict[int, Any]:
    """Each layer's node in ``model``'s own graph (a layer loaded from a file, or shared with
    another model, has several)."""
    mine = {id(n) for nodes in model._nodes_by_depth.values() for n in nodes}
    out = {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            if id(node) in mine:
                out[id(layer)] = node
                break
    return out


def cut_points(model: keras.Model) -> dict[int, Any]:
    """Index ``i`` into ``model.layers`` -> layer i's output tensor, for every ``i`` after which
    that one tensor is all the rest of the model needs."""
    layers = model.layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    nodes = _own_nodes(model)
    edges: list[tuple[int, int]] = []
    for j, layer in enumerate(layers):
        node = nodes.get(id(layer))
        if node is None:
            continue
        for parent in node.parent_nodes:
            i = index.get(id(parent.operation))
            if i is not None:
                edges.append((i, j))
    valid = {}
    for i, layer in enumerate(layers[:-1]):
        node = nodes.get(id(layer))
        outputs = keras.tree.flatten(node.outputs) if node is not None else []
        if len(outputs) == 1 and all(u == i for u, v in edges if u <= i < v):
            valid[i] = outputs[0]
    return valid


def plan_cut(model: keras.Model, valid: dict[int, Any]) -> Cut | None:
    """The deepest valid cut with every layer up to it frozen and deterministic, or None."""
    layers = model.layers
    safe_until = 0
    while safe_until + 1 < len(layers) and cache_safe(layers[safe_until + 1]):
        safe_until += 1
    best = max((i for i in valid if 0 < i <= safe_until), default=None)
    if best is None:
        return None
    tensor = valid[best]
    return Cut(best, layers[best].name, tuple(int(d) for d in tensor.shape[1:]), tensor)


def suffix_model(model: keras.Model, cut: Cut) -> keras.Model:
    """The layers after ``cut`` as a model taking the cut's features; it shares the layers
    (and so the weights) of ``model``."""
    return keras.Model(cut.tensor, model.outputs, name=f"{model.name}_suffix")


def described(layer: Any) -> list[Any]:
    """``[class name, config]`` of ``layer`` without its trainable flag (a layer without a
    config: its name stands in)."""
    try:
        cfg = layer.get_config()
    except Exception:
        cfg = {"name": layer.name}
    cfg.pop("trainable", None)
    return [type(layer).__name__, cfg]


# -- any model: automatic frozen-prefix detection -------------------------------------------


class Reason(enum.Enum):
    """Why a trial of a study's own model trains without the feature cache.  The trial's and
    the session's tag ``searchlab.cache.reason`` starts with the value, then a colon and the
    detail (``NoCut``)."""

    DISABLED = CACHE_DISABLED
    OWN_FIT = "the HyperModel's own fit trains the model"
    NOT_A_GRAPH = "not a graph of layers"
    NO_FROZEN = CACHE_NO_FROZEN
    NO_PREFIX = "no frozen prefix"
    RANDOM_LAYER = "augmentation, dropout or noise before the frozen layers"
    TOO_LARGE = "features larger than the memory bound"
    RANDOM_WEIGHTS = "frozen weights differ per trial"
    NOT_RECOMPILABLE = "its compile arguments cannot be copied"


@dataclass(frozen=True)
class NoCut:
    """A model trains on the raw inputs: ``reason``, with ``detail`` saying what to change."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


AUTO_GRAPH_INPUT = "searchlab_input"


def graph_of(model: Any, input_shape: tuple[int, ...] | None = None) -> keras.Model | None:
    """``model`` as a functional graph whose layers ``cut_points`` can read: a functional
    model itself; a ``Sequential``'s layers called on a new input (they are shared: training
    a part of that graph trains ``model``); None for a subclassed model or a ``Sequential``
    that is not built and has no ``input_shape`` to build with."""
    if isinstance(model, keras.Sequential):
        if not model.built:
            if input_shape is None:
                return None
            model.build((None, *input_shape))
        if len(model.inputs) != 1:
            return None
        given = model.inputs[0]
        inputs = keras.Input(batch_shape=given.shape, dtype=given.dtype, name=AUTO_GRAPH_INPUT)
        x = inputs
        for layer in model.layers:
            for part in _inlined(layer):
                x = part(x)
        return keras.Model(inputs, x, name=model.name)
    if getattr(model, "_nodes_by_depth", None) is None:  # subclassed: no graph of layers
        return None
    return model


def _inlined(layer: Any) -> list[Any]:
    """The layers that stand for ``layer`` in a ``Sequential``'s graph: a nested model that
    is partly frozen (a backbone whose last block is fine-tuned) and a chain of layers (each
    takes the one before's output, as VGG's do) is replaced by its layers, so the cut may
    fall inside it; any other layer stands for itself."""
    if not isinstance(layer, keras.Model) or not layer.trainable_weights:
        return [layer]
    inner = [sub for sub in layer.layers if not isinstance(sub, keras.layers.InputLayer)]
    if not any(is_frozen(sub) for sub in inner):
        return [layer]
    if not isinstance(layer, keras.Sequential):
        if getattr(layer, "_nodes_by_depth", None) is None or len(layer.inputs) != 1:
            return [layer]
        if any(not isinstance(op, keras.layers.Layer) for op in layer.operations):
            return [layer]  # keras.ops calls between its layers: only the model runs them
        if set(cut_points(layer)) != set(range(len(layer.layers) - 1)):
            return [layer]  # not a chain: a branch would cross the cut
    return [part for sub in inner for part in _inlined(sub)]


def is_frozen(layer: Any) -> bool:
    return bool(layer.weights) and not layer.trainable_weights


def why_no_cut(graph: keras.Model) -> NoCut:
    """Why ``plan_cut`` found no cut in ``graph``: it has no frozen layer, or the first layer
    that is not frozen and deterministic trains, or acts randomly before frozen layers."""
    layers = [layer for layer in graph.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not any(is_frozen(layer) for layer in layers):
        return NoCut(
            Reason.NO_FROZEN,
            "every layer with weights trains; freeze a backbone (trainable=False) to cache "
            "its output",
        )
    for i, layer in enumerate(layers):
        if cache_safe(layer):
            continue
        if is_random(layer) and any(is_frozen(later) for later in layers[i + 1 :]):
            if isinstance(layer, keras.layers.Lambda):
                return NoCut(
                    Reason.RANDOM_LAYER,
                    f"{layer.name} (Lambda) runs code that may be random, before frozen "
                    "layers; preprocess with a layer (Rescaling, Normalization) or in the data",
                )
            return NoCut(
                Reason.RANDOM_LAYER,
                f"{layer.name} ({type(layer).__name__}) acts before frozen layers, so their "
                "output changes each epoch; augment in the data pipeline instead, or train "
                "without the cache",
            )
        return NoCut(
            Reason.NO_PREFIX,
            f"the first layer with weights, {layer.name} ({type(layer).__name__}), trains: "
            "only frozen layers at the model's start are cached",
        )
    return NoCut(Reason.NO_PREFIX, "no layer where one tensor carries the frozen part")
