"""Frozen-prefix feature cache: compute the frozen part of a model once, train the rest on it.

When the first layers of a model are frozen and nothing random acts on them (no augmentation
or dropout before the cut; a frozen BatchNorm runs in inference mode in Keras 3), their output
is the same in every epoch and in every trial that freezes the same prefix.  ``plan_cut`` finds
the deepest layer where the model can be cut (one tensor crosses the cut, everything before it
is frozen and deterministic), ``FeatureCache.features`` computes that layer's outputs for the
training and validation images once, and ``suffix_model`` is the rest of the model -- sharing
its layers, so training it trains the complete model.

Features are keyed by (model name, the prefix layers' configs -- which cover the input size,
resizing and preprocessing --, a hash of the prefix's weights, the cut layer, the data's
fingerprint).  They are kept in memory (LRU, bounded) and on disk under the project folder
(``.searchlab/feature-cache/``, bounded, oldest files evicted first) so a resumed or parallel
study reuses them; workers of one machine that need the same features at once compute them
once (``FeatureCache.computing``: the others wait on a file lock, then read the disk).
Bounds: ``$SEARCHLAB_CACHE_MEMORY_MB`` (default 2048) and ``$SEARCHLAB_CACHE_DISK_MB``
(default 4096; 0 turns the disk cache off).

Which models: a builder that satisfies ``TransferBuilder`` (below; ``searchlab.models.Transfer``
does) says how it trains in phases, how to freeze, and how to build the part after a cut; this
module asks nothing else of it and imports no builder.  Any other compiled model (a user's
``build_model(hp)``, HyperModel or builder) goes through ``auto_cut`` (at the end): its graph
(``graph_of``: a ``Sequential``'s layers are called again on a new input, sharing them; a
nested backbone model is one layer, cut after, unless it is partly frozen and a chain of
layers: then its layers are called in its place, and the cut may fall inside it) is cut by ``plan_cut`` as a
transfer model is, provided the prefix holds a frozen layer with weights, its features fit
the memory bound, the model's compile arguments can be copied onto the part after the cut
(``compile_like``), and the prefix's weights are the same as in the earlier trials of this
process with the same layer configs (a second fingerprint for one configs digest means the
backbone is initialised per trial: ``Reason.RANDOM_WEIGHTS``, remembered per
``backbone_seed``).  Otherwise ``auto_cut`` returns a ``NoCut`` whose ``Reason`` the trial
tags (``searchlab.cache.reason``) and the runner logs once per session.  Such features are
keyed as a transfer model's, plus a digest of the graph's non-layer operations (the
``keras.ops`` calls of a functional model: their class and config, not their constant
arguments) and without the model's name.

A trial whose every phase can train on features does not build its complete model:
``plan_trial`` plans the cuts on a ``Template`` (the builder's complete model, built once per
process and never trained; it also computes the features and fingerprints the prefix) and
returns a ``Plan``; the builder builds only the suffix from the shallowest cut, and
``save_suffix`` writes that suffix's weights with the cut and the prefix's fingerprint.
``load_suffix`` puts them into the complete model rebuilt by the builder (for the best model,
export, reeval) after checking that its prefix has the same fingerprint.  When ``plan_trial``
returns None the trial builds the complete model and cuts it per phase (``plan_cut``,
``suffix_model``), or trains it on raw inputs where it has no cut.

Such a trial trains a compiled suffix that an earlier trial of the same structure left in a
small per-process pool, when there is one (``training_suffix`` takes it, ``keep_suffix`` gives
it back): the backend then does not trace its train and test steps again, which is most of
what a small head costs beyond its training steps.  Before it trains, every variable is put
back where a new suffix starts (the builder's ``reset_suffix``; the optimizer's variables as
they were before its first step, the trial's learning rate; the metrics), so a trial ends
where it would have ended on a new suffix, whatever the last one did (pruned, NaN loss).
A hand-written model's part after an ``auto_cut`` trains through a ``Twin`` instead: a
compiled copy made from the part's layer configs (``Dropout`` as ``RateDropout``, its rate in
variables) with a new optimizer of the model's config, pooled by ``twin_key`` (the structure
without layer names, dropout rates or a constant learning rate).  Each trial puts its own
part's variables into the twin (``Twin.take``: weights, dropout seed states and rates, the
learning rate; the optimizer and metrics as new), trains the twin, and puts the trained
weights back into its part (``Twin.give``) before saving the complete model.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import keras
import numpy as np

from searchlab import backend, config
from searchlab.data import Data
from searchlab.errors import StudyDefinitionError
from searchlab.outcome import CACHE_DISABLED, CACHE_NO_FROZEN

log = logging.getLogger(__name__)
MEMORY_ENV = "SEARCHLAB_CACHE_MEMORY_MB"
DISK_ENV = "SEARCHLAB_CACHE_DISK_MB"
CACHE_DIR = "feature-cache"
#: in the disk folder: held by the process computing features (``FeatureCache.computing``)
COMPUTING_LOCK = ".computing.lock"


class Source(enum.Enum):
    """Where a trial's features came from."""

    MEMORY = "memory"
    DISK = "disk"
    COMPUTED = "computed"


@dataclass(frozen=True)
class Cut:
    """Cut a model after ``layers[index]`` (``name``), whose output in the model's graph is
    ``tensor`` with per-example ``shape``."""

    index: int
    name: str
    shape: tuple[int, ...]
    tensor: Any = None


@dataclass(frozen=True)
class Features:
    x_train: np.ndarray
    x_val: np.ndarray
    key: str
    source: Source

    @property
    def nbytes(self) -> int:
        return int(self.x_train.nbytes + self.x_val.nbytes)


@runtime_checkable
class TransferBuilder(Protocol):
    """A model builder that trains in phases over a frozen prefix: all that a trial and this
    cache ask of one (``searchlab.models.Transfer`` is the one we ship; ``isinstance`` tells).

    Like any study model builder, ``build(params, info)`` returns the complete model, compiled.
    A builder without the rest trains that model as built, in one phase, without the cache.

    Call order in one trial (``searchlab.trial``), ``frozen`` counting backbone layers:

    1. Only if ``feature_cache``: ``template_key(info)`` names the process's template; a new
       key builds it once with ``build_uncompiled({}, info)`` (never trained).  On it,
       ``schedule(params, template, epochs)`` gives the phases, and per phase
       ``freeze(template, frozen)`` exposes that phase's cut (``plan_trial``).
    2. The trial seeds the random streams, then builds.  When every phase has a cut whose
       features fit in memory, only the suffix after the shallowest cut: a pooled suffix of
       equal ``suffix_key(params, info, template, cut)`` (None: never pooled) is put back by
       ``reset_suffix(suffix, params, template)``, else ``build_suffix(params, info,
       template, cut)`` builds one -- the two must draw the same from ``random``.  Otherwise
       the complete model, ``build(params, info)``, whose phases ``schedule(params, model,
       epochs)`` gives.
    3. Per phase, in order: ``freeze(model, frozen)``; the model that trains in it (the one
       built, or its part after the phase's cut) is compiled by ``compile(part, params,
       lr_factor)`` -- on a reused suffix its optimizer restarts at ``learning_rate(params,
       lr_factor)`` instead; the trial seeds again and fits it for the phase's epochs.

    ``group_by`` names the param that moves the cut: grid search runs the points that share
    its value one after the other, so their features are computed once.
    """

    feature_cache: bool
    group_by: str

    def __call__(self, params: Mapping[str, Any], info: Any) -> keras.Model:
        """The complete model for ``params``, compiled, frozen for its first phase."""
        ...

    def schedule(
        self, params: Mapping[str, Any], model: keras.Model, study_epochs: int
    ) -> list[tuple[int, int, float]]:
        """The trial's phases as (epochs, frozen, learning-rate factor)."""
        ...

    def freeze(self, model: keras.Model, frozen: int) -> None:
        """Freeze the first ``frozen`` backbone layers of ``model`` (a complete model, the
        template or a suffix) and let the rest train."""
        ...

    def compile(
        self, model: keras.Model, params: Mapping[str, Any], lr_factor: float = 1.0
    ) -> None:
        """Compile ``model`` at ``learning_rate(params, lr_factor)``."""
        ...

    def learning_rate(self, params: Mapping[str, Any], lr_factor: float = 1.0) -> float: ...

    def template_key(self, info: Any) -> Hashable:
        """Equal keys: the same layers before the head (one template serves both)."""
        ...

    def build_uncompiled(self, params: Mapping[str, Any], info: Any) -> tuple[keras.Model, int]:
        """The complete model, not compiled, and its backbone's layer count."""
        ...

    def build_suffix(
        self, params: Mapping[str, Any], info: Any, template: keras.Model, cut: Cut
    ) -> keras.Model:
        """The layers after ``cut`` of the complete model, taking the cut's features: the same
        layer names, and the same start, as in ``build(params, info)``."""
        ...

    def suffix_key(
        self, params: Mapping[str, Any], info: Any, template: keras.Model, cut: Cut
    ) -> Hashable | None:
        """Equal keys: ``reset_suffix`` turns one ``build_suffix`` model into the other."""
        ...

    def reset_suffix(
        self, model: keras.Model, params: Mapping[str, Any], template: keras.Model
    ) -> None:
        """Put a trained ``build_suffix`` model where a new one for ``params`` starts."""
        ...


def is_random(layer: Any) -> bool:
    """Whether a layer may act randomly (it holds a seed generator, or it is user code); a
    nested model (a backbone inside a user's ``Sequential``) when any of its layers may."""
    if isinstance(layer, keras.layers.Lambda):  # user code: it may be random
        return True
    if isinstance(layer, keras.Model) and any(is_random(inner) for inner in layer.layers):
        return True
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())


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


def _described(layer: Any) -> list[Any]:
    """``[class name, config]`` of ``layer`` without its trainable flag (a layer without a
    config: its name stands in)."""
    try:
        cfg = layer.get_config()
    except Exception:
        cfg = {"name": layer.name}
    cfg.pop("trainable", None)
    return [type(layer).__name__, cfg]


def prefix_fingerprint(model: keras.Model, cut: Cut) -> str:
    """A hash of what the layers up to ``cut`` compute: their configs (input size, resizing,
    preprocessing; not their trainable flag or dtype policy) and their weights.  Two models
    with the same fingerprint give the same features for the same images."""
    configs, arrays = [], []
    for layer in model.layers[: cut.index + 1]:
        described = _described(layer)
        described[1].pop("dtype", None)  # the trained weights are float32 under every policy
        configs.append(described)
        for w in layer.weights:
            arrays.append(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).reshape(-1))
    h = _weights_hash(arrays)
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


#: per process: the prefix weights ``_weights_hash`` hashed last, and the hash after them
_LAST_WEIGHTS: list[tuple[list[np.ndarray], Any]] = []


def _weights_hash(arrays: list[np.ndarray]) -> Any:
    """A sha1 fed the bytes of ``arrays`` (flat, contiguous) in order.  Each trial of a study
    builds the same backbone again: where ``arrays`` equal the last call's bit for bit, the
    hash is that call's, and comparing costs a sixth of hashing (a VGG16's 59 MB on a 2-core
    CPU: 4.5 ms against 28 ms).  Kept only for arrays nobody else may write to (copies, or
    read-only views); not a torch parameter's view, which training changes in place."""
    last = _LAST_WEIGHTS[0] if _LAST_WEIGHTS else None
    if last is not None and len(last[0]) == len(arrays):
        if all(_same_bits(a, b) for a, b in zip(last[0], arrays, strict=True)):
            return last[1].copy()
    h = hashlib.sha1()
    for arr in arrays:
        h.update(arr.view(np.uint8).data)  # the bytes tobytes() gives, without copying them
    _LAST_WEIGHTS.clear()
    if all(_private(a) for a in arrays):
        _LAST_WEIGHTS.append((arrays, h.copy()))
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


def feature_batch(data: Data) -> int:
    """Images per call when computing features: 128, up to 512 for small images (CIFAR's
    32x32: VGG16's pass over 4,530 images took 6.8 s at 128, 6.2 s at 512 on a 2-core CPU,
    TensorFlow), at most 2**21 input values per batch above 128."""
    shape = getattr(data.x_train, "shape", (0, 1))
    values = max(1, int(np.prod(shape[1:])))
    return max(128, min(512, 2**21 // values))


def _prefix_key(
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


def _mb_env(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default


class FeatureCache:
    """Features of frozen prefixes, in memory (LRU) and on disk, both bounded in bytes.

    Args:
        root: the disk folder (None: ``<project>/.searchlab/feature-cache``); ``disk_mb=0``
            keeps features in memory only.
        memory_mb, disk_mb: the bounds; None reads ``$SEARCHLAB_CACHE_MEMORY_MB`` /
            ``$SEARCHLAB_CACHE_DISK_MB``.
    """

    def __init__(
        self,
        root: Path | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
    ) -> None:
        self._root = root
        self.memory_bytes = (
            memory_mb if memory_mb is not None else _mb_env(MEMORY_ENV, 2048)
        ) << 20
        self.disk_bytes = (disk_mb if disk_mb is not None else _mb_env(DISK_ENV, 4096)) << 20
        self._memory: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def root(self) -> Path:
        return self._root or config.home() / CACHE_DIR

    def fits(self, cut: Cut, data: Data) -> bool:
        """Whether the features of ``cut`` fit in the memory bound."""
        per_item = int(np.prod(cut.shape)) * 4
        return per_item * (len(data.x_train) + len(data.x_val)) <= self.memory_bytes

    def features(
        self,
        model: keras.Model,
        cut: Cut,
        data: Data,
        batch_size: int | None = None,
        key: str | None = None,
    ) -> Features:
        """The outputs of ``model.layers[cut.index]`` for the training and validation images
        (``key``: their cache key when the caller knows it, e.g. ``Template.key``), computed
        ``batch_size`` images at a time (default: ``feature_batch``)."""
        key = key or _prefix_key(model, cut, data)
        batch_size = batch_size or feature_batch(data)
        if data.streamed and self.disk_bytes > 0:  # images on disk: features memory-mapped
            return self._mapped(model, cut, data, batch_size, key)
        if key in self._memory:
            self._memory.move_to_end(key)
            return Features(*self._memory[key], key=key, source=Source.MEMORY)
        found = self._read(key)
        source = Source.DISK
        if found is None:
            with self.computing():
                found = self._read(key)  # another worker's, written while this one waited
                if found is None:
                    prefix = keras.Model(model.inputs, cut.tensor)
                    found = (
                        backend.predict_arrays(prefix, data.x_train, batch_size),
                        backend.predict_arrays(prefix, data.x_val, batch_size),
                    )
                    source = Source.COMPUTED
                    self._write(key, found)
        self._remember(key, found)
        return Features(*found, key=key, source=source)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Held while features for the disk cache are computed: the worker processes of one
        machine that need features at the same time compute them once, and the others wait
        for them, then read them from disk (an exclusive ``flock`` on ``COMPUTING_LOCK`` in
        the disk folder, released by the kernel when a holder dies).  Without a disk cache,
        or a folder to lock in, nothing is shared and nothing waits."""
        handle = None
        if self.disk_bytes > 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                handle = open(self.root / COMPUTING_LOCK, "a+b")
            except OSError as exc:
                log.debug("no feature cache lock in %s: %s", self.root, exc)
        if handle is None:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info(
                    "another searchlab process is computing cached features in %s: "
                    "waiting for it, to read them",
                    self.root,
                )
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _mapped(
        self, model: keras.Model, cut: Cut, data: Data, batch_size: int, key: str
    ) -> Features:
        """Features of inputs that stream from disk (``Data.streamed``): computed by reading
        the images once, a batch at a time, into ``<key>.x_train.npy`` / ``<key>.x_val.npy``
        in the disk folder, and handed out memory-mapped (read-only): the pages the head's
        training reads are the only ones in memory.  Not kept in the memory LRU."""
        paths = [self.root / f"{key}.{split}.npy" for split in ("x_train", "x_val")]
        mapped = _read_mapped(paths)
        if mapped is not None:
            return Features(*mapped, key=key, source=Source.DISK)
        with self.computing():
            mapped = _read_mapped(paths)  # another worker's, written while this one waited
            if mapped is not None:
                return Features(*mapped, key=key, source=Source.DISK)
            prefix = keras.Model(model.inputs, cut.tensor)
            self.root.mkdir(parents=True, exist_ok=True)
            size = int(np.prod(cut.shape)) * 4 * (len(data.x_train) + len(data.x_val))
            self._evict(self.disk_bytes - size)
            for x, path in zip((data.x_train, data.x_val), paths, strict=True):
                _stream_features(prefix, x, batch_size, path)
        found = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        return Features(found[0], found[1], key=key, source=Source.COMPUTED)

    def _remember(self, key: str, arrays: tuple[np.ndarray, np.ndarray]) -> None:
        self._memory[key] = arrays
        while len(self._memory) > 1 and self._memory_used() > self.memory_bytes:
            self._memory.popitem(last=False)

    def _memory_used(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._memory.values())

    def clear_memory(self) -> None:
        self._memory.clear()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def _read(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        if self.disk_bytes <= 0:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = (f["x_train"], f["x_val"])
            os.utime(path)  # most recently used: evicted last
            return arrays
        except (OSError, ValueError, KeyError) as exc:  # a torn or foreign file: recompute
            log.warning("ignoring unreadable feature cache file %s: %s", path, exc)
            return None

    def _write(self, key: str, arrays: tuple[np.ndarray, np.ndarray]) -> None:
        size = arrays[0].nbytes + arrays[1].nbytes
        if self.disk_bytes <= 0 or size > self.disk_bytes:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._evict(self.disk_bytes - size)
            # Write then rename: a parallel worker never reads half a file.
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x_train=arrays[0], x_val=arrays[1])
            os.replace(tmp, self._path(key))
        except OSError as exc:  # a full or read-only disk only costs the reuse
            log.warning("could not write the feature cache in %s: %s", self.root, exc)

    def _evict(self, budget: int) -> None:
        files = []
        for path in [*self.root.glob("*.npz"), *self.root.glob("*.npy")]:
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        files.sort()
        used = sum(size for _, size, _ in files)
        for _, size, path in files:
            if used <= budget:
                break
            path.unlink(missing_ok=True)
            used -= size

    def disk_usage(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in [*self.root.glob("*.npz"), *self.root.glob("*.npy")])


def _read_mapped(paths: list[Path]) -> tuple[np.ndarray, np.ndarray] | None:
    """The memory-mapped features of ``FeatureCache._mapped`` if both files are there and
    readable (then most recently used: evicted last); None to compute them."""
    if not all(p.is_file() for p in paths):
        return None
    try:
        found = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        for p in paths:
            os.utime(p)
        return found[0], found[1]
    except (OSError, ValueError) as exc:  # a torn or foreign file: recompute
        log.warning("ignoring unreadable feature cache files %s: %s", paths[0], exc)
        return None


def _stream_features(prefix: keras.Model, x: Any, batch_size: int, path: Path) -> None:
    """``prefix``'s outputs for ``x`` (read a batch at a time) written to the ``.npy`` file
    ``path``: through a temporary file and a rename, so a parallel worker never maps half a
    file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, max(len(x), 1), batch_size):
                out = np.asarray(
                    backend.predict_arrays(prefix, x[start : start + batch_size], batch_size)
                )
                if out.dtype not in (np.float16, np.float32, np.float64):  # bfloat16: no .npy
                    out = out.astype("float32")
                if start == 0:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(out.dtype),
                        "fortran_order": False,
                        "shape": (len(x), *out.shape[1:]),
                    }
                    np.lib.format.write_array_header_2_0(f, header)
                f.write(np.ascontiguousarray(out).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_DEFAULT: FeatureCache | None = None


def default_cache() -> FeatureCache:
    """The process-wide cache (its disk folder follows ``$SEARCHLAB_HOME`` at each use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = FeatureCache()
    return _DEFAULT


# -- trials without their complete model ---------------------------------------------------


@dataclass
class Template:
    """A builder's complete model, built once per process and never trained.

    It stands in for the complete model wherever a cached trial needs the frozen prefix:
    planning the cut of each phase, computing (once) and keying the features, and the prefix
    fingerprint that a suffix-weights file refers to.  Its weights never change, so the
    fingerprints and keys computed from it are kept.
    """

    model: keras.Model
    valid: dict[int, Any]
    fingerprints: dict[int, str] = field(default_factory=dict)
    keys: dict[tuple[int, str], str] = field(default_factory=dict)

    def cut(self, freeze: Callable[[keras.Model, int], None], frozen: int) -> Cut | None:
        freeze(self.model, frozen)
        return plan_cut(self.model, self.valid)

    def fingerprint(self, cut: Cut) -> str:
        if cut.index not in self.fingerprints:
            self.fingerprints[cut.index] = prefix_fingerprint(self.model, cut)
        return self.fingerprints[cut.index]

    def key(self, cut: Cut, data: Data) -> str:
        memo = (cut.index, data.fingerprint)
        if memo not in self.keys:
            self.keys[memo] = _prefix_key(self.model, cut, data, self.fingerprint(cut))
        return self.keys[memo]


#: per process: the template of the last builder/data shape/dtype policy asked for (one is
#: kept: a template holds a complete backbone)
_TEMPLATES: dict[tuple, Template] = {}


def template(build: TransferBuilder, info: Any) -> Template:
    """The process-wide template of ``build`` (a ``Transfer``) for data of ``info``'s shape.

    It survives ``keras.backend.clear_session()`` between trials (the trials' own models do
    not), so memory stays flat: one complete model per process, whatever the trial count."""
    key = (build.template_key(info), keras.config.dtype_policy().name, keras.backend.backend())
    found = _TEMPLATES.get(key)
    if found is None:
        _TEMPLATES.clear()
        _SUFFIXES.clear()  # they were cut from the old template
        model, _ = build.build_uncompiled({}, info)
        found = _TEMPLATES[key] = Template(model, cut_points(model))
    return found


@dataclass(frozen=True)
class Plan:
    """A trial whose every phase trains on cached features: per phase its cut (on the
    template); the trial's model is the builder's suffix from the shallowest cut, ``base``."""

    template: Template
    phases: list[tuple[int, int, float]]
    cuts: list[Cut]

    @property
    def base(self) -> Cut:
        return min(self.cuts, key=lambda c: c.index)

    def train_model(self, model: keras.Model, cut: Cut) -> keras.Model:
        """The part of ``model`` (the suffix from ``base``) that trains on ``cut``'s features."""
        if cut.index == self.base.index:
            return model
        return keras.Model(
            model.get_layer(cut.name).output, model.outputs, name=f"{model.name}_suffix"
        )


def plan_trial(
    build: TransferBuilder,
    params: Mapping[str, Any],
    info: Any,
    epochs: int,
    data: Data,
    store: FeatureCache,
) -> Plan | None:
    """The plan of a trial of ``build`` when its feature cache is on and every phase can train
    on cached features that fit in memory; None when one cannot (that trial builds its
    complete model)."""
    if not build.feature_cache:
        return None
    tpl = template(build, info)
    phases = build.schedule(params, tpl.model, epochs)
    cuts = []
    for _, frozen, _ in phases:
        cut = tpl.cut(build.freeze, frozen)
        if cut is None or not store.fits(cut, data):
            return None
        cuts.append(cut)
    return Plan(tpl, phases, cuts) if cuts else None


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

#: per process: compiled suffixes that trials gave back, by structure, least recently used
#: first; at most ``SUFFIX_POOL_SIZE`` of them and ``SUFFIX_POOL_MB`` of their variables
#: (the newest is kept whatever its size)
_SUFFIXES: OrderedDict[tuple, Suffix] = OrderedDict()
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

    def phase_model(self, plan: Plan, phase: int) -> keras.Model:
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
        self.starts[phase] = _optimizer_starts(optimizer)

    def restart(self, phase: int, learning_rate: float) -> None:
        """Put the phase model's optimizer (steps, moments, learning rate) and metrics where
        they were before its first step, with ``learning_rate``."""
        train = self.phases[phase]
        optimizer = train.optimizer
        _restart_optimizer(optimizer, self.starts[phase])
        optimizer.learning_rate = learning_rate
        train.reset_metrics()

    @property
    def nbytes(self) -> int:
        variables = {id(v): v for v in self.model.variables}
        for train in self.phases.values():
            if train.optimizer is not None:
                variables.update((id(v), v) for v in train.optimizer.variables)
        return sum(int(np.prod(v.shape)) * _itemsize(v.dtype) for v in variables.values())


def _optimizer_starts(optimizer: Any) -> list[np.ndarray | None]:
    """A built optimizer's variables before its first step (None: zeros), for
    ``_restart_optimizer``."""
    return [
        value if value.any() else None
        for value in (np.asarray(keras.ops.convert_to_numpy(v)) for v in optimizer.variables)
    ]


def _restart_optimizer(optimizer: Any, starts: list[np.ndarray | None]) -> None:
    """Put ``optimizer``'s steps and moments back where ``_optimizer_starts`` found them."""
    for variable, start in zip(optimizer.variables, starts, strict=True):
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype) if start is None else start)


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # bfloat16, which NumPy does not name
        return 2


def _suffix_key(
    build: TransferBuilder, params: Mapping[str, Any], info: Any, plan: Plan
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
    build: TransferBuilder, params: Mapping[str, Any], info: Any, plan: Plan
) -> Suffix:
    """The suffix a trial of ``plan`` trains: a pooled one of the same structure, reset to
    where a new one starts (the builder draws the same seeds), else a new one."""
    key = _suffix_key(build, params, info, plan)
    found = _SUFFIXES.pop(key, None) if key is not None else None
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
    _SUFFIXES[suffix.key] = suffix
    _SUFFIXES.move_to_end(suffix.key)
    budget = SUFFIX_POOL_MB << 20
    while len(_SUFFIXES) > 1 and (
        len(_SUFFIXES) > SUFFIX_POOL_SIZE or sum(x.nbytes for x in _SUFFIXES.values()) > budget
    ):
        _SUFFIXES.popitem(last=False)


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
    if not any(_frozen(sub) for sub in inner):
        return [layer]
    if not isinstance(layer, keras.Sequential):
        if getattr(layer, "_nodes_by_depth", None) is None or len(layer.inputs) != 1:
            return [layer]
        if any(not isinstance(op, keras.layers.Layer) for op in layer.operations):
            return [layer]  # keras.ops calls between its layers: only the model runs them
        if set(cut_points(layer)) != set(range(len(layer.layers) - 1)):
            return [layer]  # not a chain: a branch would cross the cut
    return [part for sub in inner for part in _inlined(sub)]


def _frozen(layer: Any) -> bool:
    return bool(layer.weights) and not layer.trainable_weights


def why_no_cut(graph: keras.Model) -> NoCut:
    """Why ``plan_cut`` found no cut in ``graph``: it has no frozen layer, or the first layer
    that is not frozen and deterministic trains, or acts randomly before frozen layers."""
    layers = [layer for layer in graph.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not any(_frozen(layer) for layer in layers):
        return NoCut(
            Reason.NO_FROZEN,
            "every layer with weights trains; freeze a backbone (trainable=False) to cache "
            "its output",
        )
    for i, layer in enumerate(layers):
        if cache_safe(layer):
            continue
        if is_random(layer) and any(_frozen(later) for later in layers[i + 1 :]):
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


#: per process: the configs digest of each prefix cut so far -> its weights fingerprint; a
#: second fingerprint for the same configs means the prefix is initialised per trial
_SEEN_PREFIXES: OrderedDict[str, str] = OrderedDict()
_RANDOM_PREFIXES: set[str] = set()


def _graph_digest(graph: keras.Model, cut: Cut) -> str:
    """A hash of the prefix's layer configs and of the graph's other operations (the
    ``keras.ops`` calls of a functional model, e.g. ``preprocess_input``), without weights."""
    described = [_described(layer) for layer in graph.layers[: cut.index + 1]]
    for op in getattr(graph, "operations", []):
        if not isinstance(op, keras.layers.Layer):
            try:
                described.append([type(op).__name__, op.get_config()])
            except Exception:
                described.append([type(op).__name__, getattr(op, "name", "")])
    return hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


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
    if not any(_frozen(layer) for layer in graph.layers[1 : cut.index + 1]):
        return why_no_cut(graph)
    if not store.fits(cut, data):
        mb = int(np.prod(cut.shape)) * 4 * (len(data.x_train) + len(data.x_val)) >> 20
        return NoCut(
            Reason.TOO_LARGE,
            f"{cut.name}'s output for the data takes {mb} MB, more than "
            f"${MEMORY_ENV}={store.memory_bytes >> 20}; raise it or cut after a smaller layer",
        )
    graph_digest = _graph_digest(graph, cut)
    digest = hashlib.sha1(repr((graph_digest, scope)).encode()).hexdigest()
    weights_differ = NoCut(
        Reason.RANDOM_WEIGHTS,
        "the frozen layers are initialised anew in each trial (weights=None?); set "
        "Study(backbone_seed=...) to build them from one seed, or load weights",
    )
    if digest in _RANDOM_PREFIXES:
        return weights_differ
    fingerprint = prefix_fingerprint(graph, cut)
    seen = _SEEN_PREFIXES.get(digest)
    if seen is not None and seen != fingerprint:
        _RANDOM_PREFIXES.add(digest)
        return weights_differ
    _SEEN_PREFIXES[digest] = fingerprint
    _SEEN_PREFIXES.move_to_end(digest)
    while len(_SEEN_PREFIXES) > 64:
        _SEEN_PREFIXES.popitem(last=False)
    try:
        args = _compile_args(model)
    except Exception as exc:  # a custom loss or metric Keras cannot deserialize
        return NoCut(
            Reason.NOT_RECOMPILABLE,
            f"{type(exc).__name__}: {exc}; register custom losses and metrics with "
            "keras.saving.register_keras_serializable",
        )
    key = _prefix_key(graph, cut, data, f"{fingerprint}:{graph_digest}", name="auto")
    return AutoCut(graph, cut, fingerprint, key, args)


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


#: per process: compiled twins of hand-written models' parts after a cut, by structure
#: (``twin_key``), least recently used first; at most ``SUFFIX_POOL_SIZE`` of them
_TWINS: OrderedDict[str, Twin] = OrderedDict()


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
            _restart_optimizer(train.optimizer, self.starts)
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
        self.starts = _optimizer_starts(optimizer)

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
    found = _TWINS.pop(key, None)
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
    _TWINS[twin.key] = twin
    _TWINS.move_to_end(twin.key)
    while len(_TWINS) > SUFFIX_POOL_SIZE:
        _TWINS.popitem(last=False)
