"""Named datasets, the data directory, subsets and light preprocessing. No model code.

Labels reach ``fit`` as the user gave them: a loader's labels keep their shape and dtype
(int class ids, one-hot rows, multi-label rows, float regression targets, or several outputs
as a dict, list or tuple of arrays); only ``classes=`` (keep some classes) and
``one_hot=True`` change them, because the study asks for it.  Named datasets give int class
ids, one-hot with ``one_hot=True``.  ``num_classes`` is derived from the labels: the width of
one-hot (or multi-label) rows, the largest id + 1 for int ids, None for float targets and
several outputs.

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
        one_hot: turn int class ids into one-hot float32 rows (for ``categorical_crossentropy``).
    """

    name: str | None = None
    loader: Callable[[], Any] | None = None
    validation: str | float = "test"
    subset: int | Mapping[str, int] | tuple[tuple[str, int], ...] | None = None
    classes: tuple[int, ...] | None = None
    scale: bool = True
    one_hot: bool = False

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
    """Arrays ready for ``model.fit``: training, validation and test splits.  ``y_*`` are
    labels as ``fit`` takes them: an array, or a dict / list / tuple of arrays (several
    outputs).  ``num_classes``: None where the labels are not classes (regression targets,
    several outputs)."""

    x_train: np.ndarray
    y_train: Any
    x_val: np.ndarray
    y_val: Any
    x_test: np.ndarray
    y_test: Any
    num_classes: int | None
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
            arrays = [self.x_train, *leaves(self.y_train), self.x_val, *leaves(self.y_val)]
            for arr in arrays:
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
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            _check_rows(dataset.label, split, x, y)
        num_classes = classes_of(y_train, y_test)
    else:
        assert dataset.name is not None
        (x_train, y_train), (x_test, y_test), source = _load_named(dataset.name, root)
        # a named dataset's labels are int class ids (CIFAR's come as (N, 1))
        y_train, y_test = y_train.reshape(-1).astype("int32"), y_test.reshape(-1).astype("int32")
        num_classes = _KNOWN[dataset.name][1]
    if dataset.classes is not None:
        x_train, y_train = _keep_classes(dataset.label, x_train, y_train, dataset.classes)
        x_test, y_test = _keep_classes(dataset.label, x_test, y_test, dataset.classes)
        num_classes = len(dataset.classes)
    if dataset.one_hot:
        y_train, y_test, num_classes = _one_hot(dataset.label, y_train, y_test, num_classes)
    if dataset.validation == "test":
        x_val, y_val = x_test, y_test
    else:
        n_val = max(1, int(round(len(x_train) * float(dataset.validation))))
        x_val, y_val = x_train[-n_val:], take(y_train, slice(-n_val, None))
        x_train, y_train = x_train[:-n_val], take(y_train, slice(None, -n_val))
    sub = dataset._subset()
    x_train, y_train = x_train[: sub.get("train")], take(y_train, slice(sub.get("train")))
    x_val, y_val = x_val[: sub.get("val")], take(y_val, slice(sub.get("val")))
    x_test, y_test = x_test[: sub.get("test")], take(y_test, slice(sub.get("test")))
    prep = _scale if dataset.scale else _as_float
    return Data(
        x_train=prep(x_train),
        y_train=y_train,
        x_val=prep(x_val),
        y_val=y_val,
        x_test=prep(x_test),
        y_test=y_test,
        num_classes=num_classes,
        source=source,
    )


def leaves(y: Any) -> list[np.ndarray]:
    """The arrays of a labels structure (one array, or a dict / list / tuple of them)."""
    if isinstance(y, Mapping):
        return [a for k in sorted(y) for a in leaves(y[k])]
    if isinstance(y, list | tuple):
        return [a for v in y for a in leaves(v)]
    return [y]


def take(y: Any, index: Any) -> Any:
    """``y[index]`` for every array of a labels structure, keeping the structure."""
    if isinstance(y, Mapping):
        return {k: take(v, index) for k, v in y.items()}
    if isinstance(y, list | tuple):
        return type(y)(take(v, index) for v in y)
    return y[index]


def _labels(y: Any) -> Any:
    """A loader's labels as arrays, structure kept: several outputs are a dict, or a list or
    tuple whose items are arrays; anything else is one array (a list of ints, a Series)."""
    if isinstance(y, Mapping):
        return {k: np.asarray(v) for k, v in y.items()}
    if isinstance(y, list | tuple) and y and all(hasattr(v, "shape") for v in y):
        return type(y)(np.asarray(v) for v in y)
    return np.asarray(y)


def _check_rows(label: str, split: str, x: np.ndarray, y: Any) -> None:
    for arr in leaves(y):
        if arr.ndim == 0 or len(arr) != len(x):
            rows = "a scalar" if arr.ndim == 0 else f"{len(arr)} rows"
            raise DataError(
                f"The data loader {label!r} gives {len(x)} {split} inputs but labels with "
                f"{rows}: return one label (row) per input."
            )


def _class_ids(y: Any) -> bool:
    return (
        isinstance(y, np.ndarray)
        and (y.dtype.kind in "iub")
        and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1))
    )


def _rows_of_0_1(y: Any) -> bool:
    """One-hot or multi-label rows: 2-D, more than one column, every value 0 or 1."""
    return (
        isinstance(y, np.ndarray)
        and y.ndim == 2
        and y.shape[1] > 1
        and y.dtype.kind in "iubf"
        and bool(np.isin(y, (0, 1)).all())
    )


def classes_of(*ys: Any) -> int | None:
    """How many classes labels hold: int ids -> the largest + 1; one-hot or multi-label rows
    -> their width; float targets, other shapes and several outputs -> None."""
    if all(_class_ids(y) for y in ys):
        return int(max(int(y.max()) if y.size else 0 for y in ys)) + 1
    if all(_rows_of_0_1(y) for y in ys) and len({y.shape[1] for y in ys}) == 1:
        return int(ys[0].shape[1])
    return None


def _as_pairs(raw: Any) -> tuple[tuple[np.ndarray, Any], tuple[np.ndarray, Any]]:
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
    return (np.asarray(a), _labels(b)), (np.asarray(c), _labels(d))


def _keep_classes(
    label: str, x: np.ndarray, y: Any, classes: tuple[int, ...]
) -> tuple[np.ndarray, Any]:
    if _class_ids(y):
        flat = y.reshape(-1)
        mask = np.isin(flat, classes)
        remap = {c: i for i, c in enumerate(classes)}
        kept = np.array([remap[int(v)] for v in flat[mask]], dtype=y.dtype)
        return x[mask], kept.reshape((-1, *y.shape[1:]))
    if _rows_of_0_1(y) and max(classes) < y.shape[1]:  # one-hot: keep those columns
        mask = y[:, list(classes)].any(axis=1) & (y.sum(axis=1) == 1)
        return x[mask], y[mask][:, list(classes)]
    raise DataError(
        f"Dataset {label!r}: classes= keeps some classes of int class ids or one-hot labels, "
        "and these labels are neither. Drop classes=, or select the classes in the loader."
    )


def _one_hot(label: str, y_train: Any, y_test: Any, num_classes: int | None) -> tuple:
    if not (_class_ids(y_train) and _class_ids(y_test)) or num_classes is None:
        raise DataError(
            f"Dataset {label!r}: one_hot=True turns int class ids into one-hot rows, but these "
            "labels are not int class ids. Drop one_hot=True (they reach fit as they are)."
        )
    eye = np.eye(num_classes, dtype="float32")
    return eye[y_train.reshape(-1)], eye[y_test.reshape(-1)], num_classes


def _scale(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype("float32") / 255.0
    return x.astype("float32")


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype("float32")


def _read_npz(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The four arrays of a dataset file, or one ``DataError`` that says what is wrong with
    it: empty, cut short, not an .npz, a key missing, or images that are not numbers."""
    fix = "Replace it with a complete copy (download it again), or remove it."
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: it is not a dataset .npz. {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as exc:  # a cut-short zip, a .npy, a pickle, a missing key, bad bytes
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path} is not a readable dataset .npz with x_train, y_train, x_test, y_test "
            f"({type(exc).__name__}: {why}). {fix}"
        ) from exc
    for name in ("x_train", "x_test"):
        dtype = arrays[name].dtype
        if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
            raise DataError(
                f"{path}: {name} holds {dtype} values, not numbers. Save the images as a "
                "numeric array (uint8 pixels or floats)."
            )
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


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
    num_classes: int | None  # None: regression targets, or several outputs


def info_of(data: Data) -> DataInfo:
    return DataInfo(input_shape=data.input_shape, num_classes=data.num_classes)


def classes_tag(num_classes: int | None) -> str:
    """``num_classes`` as the ``searchlab.num_classes`` tag holds it (``none``: not classes)."""
    return "none" if num_classes is None else str(num_classes)


def classes_from_tag(value: str | None) -> int | None:
    """The tag ``classes_tag`` wrote, back as ``num_classes``."""
    return int(value) if value and value.isdigit() else None
