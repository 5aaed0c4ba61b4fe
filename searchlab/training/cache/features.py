"""The feature store: a frozen prefix's outputs, in memory (LRU) and on disk, both bounded in
bytes; workers of one machine compute each once (a file lock)."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend, config
from searchlab.data import Data
from searchlab.training.cache.fingerprint import prefix_key
from searchlab.training.cache.graph import Cut
from searchlab.training.cache.pools import POOLS

log = logging.getLogger("searchlab.cache")  # the name log lines and configs know


log = logging.getLogger("searchlab.cache")  # the name log lines and configs know
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
class Features:
    x_train: np.ndarray
    x_val: np.ndarray
    key: str
    source: Source

    @property
    def nbytes(self) -> int:
        return int(self.x_train.nbytes + self.x_val.nbytes)


def feature_batch(data: Data) -> int:
    """Images per call when computing features: 128, up to 512 for small images (CIFAR's
    32x32: VGG16's pass over 4,530 images took 6.8 s at 128, 6.2 s at 512 on a 2-core CPU,
    TensorFlow), at most 2**21 input values per batch above 128."""
    shape = getattr(data.x_train, "shape", (0, 1))
    values = max(1, int(np.prod(shape[1:])))
    return max(128, min(512, 2**21 // values))


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
        key = key or prefix_key(model, cut, data)
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


def default_cache() -> FeatureCache:
    """The process-wide cache (its disk folder follows ``$SEARCHLAB_HOME`` at each use)."""
    if POOLS.features is None:
        POOLS.features = FeatureCache()
    return POOLS.features
