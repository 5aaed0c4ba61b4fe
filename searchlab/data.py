"""Named datasets, the data directory, subsets and light preprocessing. No model code.

Where data is looked for, in order: the data directory (``--data-dir``, else the
``SEARCHLAB_DATA_DIR`` environment variable), Keras's own cache (``~/.keras/datasets``), and
only then ``keras.datasets.<name>.load_data()``, which downloads.  Offline and not found gives
one ``DataError`` line that says which file to put where.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchlab.errors import DataError

DATA_DIR_ENV = "SEARCHLAB_DATA_DIR"

#: name -> (files to look for in the data directory, in order; number of classes)
_KNOWN: dict[str, tuple[tuple[str, ...], int]] = {
    "mnist": (("mnist.npz",), 10),
    "fashion_mnist": (("fashion_mnist.npz", "fashion-mnist.npz"), 10),
    "cifar10": (("cifar10.npz", "cifar10_subset.npz", "cifar10_subset_small.npz"), 10),
    "cifar100": (("cifar100.npz",), 100),
}
DATASETS = tuple(_KNOWN)


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The data directory in force: the explicit one, else ``$SEARCHLAB_DATA_DIR``, else None."""
    value = explicit if explicit else os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser().resolve() if value else None


@dataclass(frozen=True)
class Dataset:
    """Which data a study trains on, and how it is split.

    Args:
        name: a named dataset (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``), or
            None when ``loader`` is given.
        loader: a function returning ``(x_train, y_train, x_test, y_test)`` numpy arrays.
        validation: ``"test"`` validates on the test split; a float in (0, 1) holds out that
            fraction of the training split (its last part) and keeps the test split untouched.
        subset: at most this many examples per split: an int (training split only) or a dict
            with keys ``train``, ``val``, ``test``.  For quick runs.
        classes: keep only these labels, renumbered 0..k-1 in the given order.
        scale: divide uint8 pixels by 255 into float32 (``False`` keeps 0..255 as float32,
            which ImageNet backbones' own preprocessing expects).
    """

    name: str | None = None
    loader: Callable[[], Any] | None = None
    validation: str | float = "test"
    subset: int | Mapping[str, int] | tuple[tuple[str, int], ...] | None = None
    classes: tuple[int, ...] | None = None
    scale: bool = True

    def __post_init__(self) -> None:
        # Normalise to hashable values so a Dataset can key the per-process cache.
        if isinstance(self.subset, Mapping):
            object.__setattr__(self, "subset", tuple(sorted(self.subset.items())))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))

    def check(self) -> None:
        if (self.name is None) == (self.loader is None):
            raise DataError("A Dataset needs exactly one of name= or loader=.")
        if self.name is not None and self.name not in _KNOWN:
            raise DataError(
                f"Unknown dataset {self.name!r}. Known datasets: {', '.join(DATASETS)}; "
                "or pass loader=your_function."
            )
        if isinstance(self.validation, str):
            if self.validation != "test":
                raise DataError(
                    f"validation must be 'test' or a fraction in (0, 1), got {self.validation!r}."
                )
        elif not 0.0 < float(self.validation) < 1.0:
            raise DataError(f"validation fraction must be in (0, 1), got {self.validation!r}.")
        for split, n in self._subset().items():
            if split not in ("train", "val", "test"):
                raise DataError(f"subset keys are train, val, test; got {split!r}.")
            if not isinstance(n, int) or n <= 0:
                raise DataError(f"subset[{split!r}] must be a positive int, got {n!r}.")

    def _subset(self) -> dict[str, int]:
        if self.subset is None:
            return {}
        if isinstance(self.subset, int):
            return {"train": self.subset}
        return dict(self.subset)

    @property
    def label(self) -> str:
        return self.name or str(getattr(self.loader, "__name__", "loader"))


@dataclass(frozen=True)
class Data:
    """Arrays ready for ``model.fit``: training, validation and test splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str = ""
    _fingerprint: list[str] = field(default_factory=list, repr=False, compare=False)
    _digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def fingerprint(self) -> str:
        """A hash of every array: the same data gives the same fingerprint in any process."""
        if not self._fingerprint:
            h = hashlib.sha1()
            for arr in (self.x_train, self.y_train, self.x_val, self.y_val):
                h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            self._fingerprint.append(h.hexdigest()[:16])
        return self._fingerprint[0]

    def digest(self, split: str) -> str:
        """A hash of one split's arrays (``train``, ``val`` or ``test``), as ``fingerprint``
        is of the training and validation data together (an MLflow dataset's digest)."""
        if split not in self._digests:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            h = hashlib.sha1()
            for arr in (x, y):
                h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            self._digests[split] = h.hexdigest()[:16]
        return self._digests[split]


def load(dataset: Dataset | str, data_dir_: str | os.PathLike[str] | None = None) -> Data:
    """Load and split a dataset (cached per process, so trials do not reload it)."""
    if isinstance(dataset, str):
        dataset = Dataset(dataset)
    dataset.check()
    root = data_dir(data_dir_)
    return _load_cached(dataset, str(root) if root else None)


def forget() -> None:
    """Drop the datasets this process keeps (a launcher whose workers load their own)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: Dataset, root: str | None) -> Data:
    if dataset.loader is not None:
        try:
            raw = dataset.loader()
            (x_train, y_train), (x_test, y_test) = _as_pairs(raw)
        except DataError:
            raise
        except Exception as exc:  # the user's loader: report it as a data error
            raise DataError(f"The data loader {dataset.label!r} failed: {exc}") from exc
        source = f"loader {dataset.label}"
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    else:
        assert dataset.name is not None
        (x_train, y_train), (x_test, y_test), source = _load_named(dataset.name, root)
        num_classes = _KNOWN[dataset.name][1]
    y_train, y_test = y_train.reshape(-1), y_test.reshape(-1)
    if dataset.classes is not None:
        x_train, y_train = _keep_classes(x_train, y_train, dataset.classes)
        x_test, y_test = _keep_classes(x_test, y_test, dataset.classes)
        num_classes = len(dataset.classes)
    if dataset.validation == "test":
        x_val, y_val = x_test, y_test
    else:
        n_val = max(1, int(round(len(x_train) * float(dataset.validation))))
        x_val, y_val = x_train[-n_val:], y_train[-n_val:]
        x_train, y_train = x_train[:-n_val], y_train[:-n_val]
    sub = dataset._subset()
    x_train, y_train = x_train[: sub.get("train")], y_train[: sub.get("train")]
    x_val, y_val = x_val[: sub.get("val")], y_val[: sub.get("val")]
    x_test, y_test = x_test[: sub.get("test")], y_test[: sub.get("test")]
    prep = _scale if dataset.scale else _as_float
    return Data(
        x_train=prep(x_train),
        y_train=y_train.astype("int32"),
        x_val=prep(x_val),
        y_val=y_val.astype("int32"),
        x_test=prep(x_test),
        y_test=y_test.astype("int32"),
        num_classes=num_classes,
        source=source,
    )


def _as_pairs(raw: Any) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if isinstance(raw, Mapping):
        raw = (raw["x_train"], raw["y_train"], raw["x_test"], raw["y_test"])
    if len(raw) == 2:
        (a, b), (c, d) = raw
    elif len(raw) == 4:
        a, b, c, d = raw
    else:
        raise DataError(
            "A data loader must return (x_train, y_train, x_test, y_test) or "
            "((x_train, y_train), (x_test, y_test))."
        )
    return (np.asarray(a), np.asarray(b)), (np.asarray(c), np.asarray(d))


def _keep_classes(
    x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    mask = np.isin(y, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return x[mask], np.array([remap[int(v)] for v in y[mask]], dtype=y.dtype)


def _scale(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype("float32") / 255.0
    return x.astype("float32")


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype("float32")


def _read_npz(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"{path} is not a dataset .npz with x_train, y_train, x_test, y_test ({exc})."
        ) from exc


def _keras_cache() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "datasets"


def find_local(name: str, root: str | os.PathLike[str] | None = None) -> Path | None:
    """The file a named dataset would be read from (data directory, then Keras's cache), or
    None when it would have to be downloaded."""
    files, _ = _KNOWN[name]
    places = [Path(root)] if root else []
    places.append(_keras_cache())
    for place in places:
        for fname in files:
            path = place / fname
            if path.is_file():
                return path
    return None


def known_files() -> dict[str, str]:
    """File name -> the named dataset it holds, for every file name searchlab looks for."""
    return {fname: name for name, (files, _) in _KNOWN.items() for fname in files}


def dataset_files(name: str) -> tuple[str, ...]:
    """The file names a named dataset is looked for under, in order."""
    return _KNOWN[name][0]


def keras_cache_dir() -> Path:
    """Keras's own dataset cache (``$KERAS_HOME/datasets``, default ``~/.keras/datasets``)."""
    return _keras_cache()


def _load_named(name: str, root: str | None) -> tuple[Any, Any, str]:
    files, _ = _KNOWN[name]
    path = find_local(name, root)
    if path is not None:
        train, test = _read_npz(path)
        return train, test, str(path)
    # Keras's own download (it reuses its cache when the file is there).
    import keras  # heavy: only when nothing local was found

    try:
        train, test = getattr(keras.datasets, name).load_data()
    except Exception as exc:
        where = root or f"a folder named by --data-dir or ${DATA_DIR_ENV}"
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise DataError(
            f"Dataset {name!r} not found locally and the download failed ({why}). "
            f"Put {files[0]} (with x_train, y_train, x_test, y_test) in {where}."
        ) from exc
    return train, test, f"keras.datasets.{name}"


@dataclass(frozen=True)
class DataInfo:
    """What a model builder needs to know of the data, without the arrays."""

    input_shape: tuple[int, ...]
    num_classes: int


def info_of(data: Data) -> DataInfo:
    return DataInfo(input_shape=data.input_shape, num_classes=data.num_classes)
