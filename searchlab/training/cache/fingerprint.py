"""What identifies a frozen prefix's features: its layer configs and weights (a fingerprint),
the data, the dtype policies and the backend (a cache key)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import keras
import numpy as np

from searchlab.data import Data
from searchlab.training.cache.graph import Cut, described
from searchlab.training.cache.pools import POOLS


def prefix_fingerprint(model: keras.Model, cut: Cut) -> str:
    """A hash of what the layers up to ``cut`` compute: their configs (input size, resizing,
    preprocessing; not their trainable flag or dtype policy) and their weights.  Two models
    with the same fingerprint give the same features for the same images."""
    configs, arrays = [], []
    for layer in model.layers[: cut.index + 1]:
        entry = described(layer)
        entry[1].pop("dtype", None)  # the trained weights are float32 under every policy
        configs.append(entry)
        for w in layer.weights:
            arrays.append(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).reshape(-1))
    h = weights_hash(arrays)
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def weights_hash(arrays: list[np.ndarray]) -> Any:
    """A sha1 fed the bytes of ``arrays`` (flat, contiguous) in order.  Each trial of a study
    builds the same backbone again: where ``arrays`` equal the last call's bit for bit, the
    hash is that call's, and comparing costs a sixth of hashing (a VGG16's 59 MB on a 2-core
    CPU: 4.5 ms against 28 ms).  Kept only for arrays nobody else may write to (copies, or
    read-only views); not a torch parameter's view, which training changes in place."""
    last = POOLS.last_weights[0] if POOLS.last_weights else None
    if last is not None and len(last[0]) == len(arrays):
        if all(_same_bits(a, b) for a, b in zip(last[0], arrays, strict=True)):
            return last[1].copy()
    h = hashlib.sha1()
    for arr in arrays:
        h.update(arr.view(np.uint8).data)  # the bytes tobytes() gives, without copying them
    POOLS.last_weights.clear()
    if all(_private(a) for a in arrays):
        POOLS.last_weights.append((arrays, h.copy()))
    return h


def _private(array: np.ndarray) -> bool:
    """Whether nobody else may write to ``array``'s memory: it is read-only, or it is (a view
    of) a NumPy array that owns its data (a copy)."""
    while array.flags.writeable and isinstance(array.base, np.ndarray):
        array = array.base
    return not array.flags.writeable or array.flags.owndata


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two flat arrays hold the same bytes (so -0.0 is not 0.0, and a NaN is itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    size = a.dtype.itemsize
    kind = f"u{size}" if size in (1, 2, 4, 8) else "u1"
    return bool(np.array_equal(a.view(kind), b.view(kind)))


def prefix_key(
    model: keras.Model,
    cut: Cut,
    data: Data,
    fingerprint: str | None = None,
    name: str | None = None,
) -> str:
    policies = [getattr(layer.dtype_policy, "name", "") for layer in model.layers[: cut.index + 1]]
    h = hashlib.sha1(
        json.dumps(
            [
                fingerprint or prefix_fingerprint(model, cut),
                policies,
                model.name if name is None else name,
                cut.name,
                cut.index,
                data.fingerprint,
                keras.backend.backend(),
            ]
        ).encode()
    )
    return h.hexdigest()[:24]


def graph_digest(graph: keras.Model, cut: Cut) -> str:
    """A hash of the prefix's layer configs and of the graph's other operations (the
    ``keras.ops`` calls of a functional model, e.g. ``preprocess_input``), without weights."""
    entries = [described(layer) for layer in graph.layers[: cut.index + 1]]
    for op in getattr(graph, "operations", []):
        if not isinstance(op, keras.layers.Layer):
            try:
                entries.append([type(op).__name__, op.get_config()])
            except Exception:
                entries.append([type(op).__name__, getattr(op, "name", "")])
    return hashlib.sha1(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()
