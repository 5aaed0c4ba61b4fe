"""Named datasets, the data directory, subsets and light preprocessing. No model code.

Labels reach ``fit`` as the user gave them: a loader's labels keep their shape and dtype
(int class ids, one-hot rows, multi-label rows, float regression targets, or several outputs
as a dict, list or tuple of arrays); only ``classes=`` (keep some classes) and
``one_hot=True`` change them, because the study asks for it.  Named datasets give int class
ids, one-hot with ``one_hot=True``.  ``num_classes`` is derived from the labels: the width of
one-hot (or multi-label) rows, the largest id + 1 for int ids, None for float targets and
several outputs.

Where data is looked for, in order: the data directory (``--data-dir``, else the
``SEARCHLAB_DATA_DIR`` environment variable, else the project's ``[tool.searchlab] data_dir``:
``config.find_data_dir`` owns the rule), Keras's own cache (``~/.keras/datasets``), and
only then ``keras.datasets.<name>.load_data()``, which downloads.  Offline and not found gives
one ``DataError`` line that says which file to put where.

Users' own data: an image folder (``Dataset(directory=...)``, one subfolder per class,
decoded with PIL through ``keras.utils.load_img``: the same on every backend), or a loader
returning a ``tf.data.Dataset`` / ``keras.utils.PyDataset`` (or a pair of them), read once
and unbatched (trials batch it at the searched batch size).  Inputs whose float32 size is
above the memory bound (``Dataset.memory_mb``, else ``config.data_memory_mb``) are written
to a file in ``config.data_cache_dir`` and stay there: ``Data.x_*`` is then a ``DiskArray``
that reads rows on demand, and ``batches`` feeds them to ``fit`` as a ``PyDataset``.  This
module never imports TensorFlow; a ``tf.data`` dataset is read through its own methods.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchlab import config
from searchlab.errors import DataError

log = logging.getLogger(__name__)
DATA_DIR_ENV = config.DATA_DIR_ENV

#: name -> (files to look for in the data directory, in order; number of classes)
_KNOWN: dict[str, tuple[tuple[str, ...], int]] = {
    "mnist": (("mnist.npz",), 10),
    "fashion_mnist": (("fashion_mnist.npz", "fashion-mnist.npz"), 10),
    "cifar10": (("cifar10.npz", "cifar10_subset.npz", "cifar10_subset_small.npz"), 10),
    "cifar100": (("cifar100.npz",), 100),
}
DATASETS = tuple(_KNOWN)


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The data directory in force (``config.find_data_dir``: the explicit one, else
    ``$SEARCHLAB_DATA_DIR``, else the project's setting), or None; raises ``DataError`` when
    the folder named does not exist, saying who named it."""
    found = config.find_data_dir(explicit)
    if found.problem is not None:
        raise DataError(found.problem)
    return found.path


@dataclass(frozen=True)
class Dataset:
    """Which data a study trains on, and how it is split.

    Args:
        name: a named dataset (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``), or
            None when ``loader`` or ``directory`` is given.
        loader: a function returning ``(x_train, y_train, x_test, y_test)`` numpy arrays; or
            a ``tf.data.Dataset`` or ``keras.utils.PyDataset`` of ``(x, y)`` (validation: a
            fraction of it), or a pair ``(train, validation)`` of such datasets.  A dataset
            is read once and unbatched; trials batch it at the searched ``batch_size``.
        directory: an image folder, one subfolder of images per class (JPEG, PNG, BMP,
            GIF), as ``keras.utils.image_dataset_from_directory`` reads it; class ids follow
            the sorted subfolder names.
        validation: ``"test"`` validates on the test split; a float in (0, 1) holds out that
            fraction of the training split (its last part; for ``directory``, the files a
            hash of their path and ``split_seed`` picks) and keeps the test split untouched.
        validation_directory: (with ``directory``) a folder of validation images with the
            same class subfolders, instead of a fraction.
        image_size: (with ``directory``) every image is resized to this (height, width).
        color_mode: (with ``directory``) ``rgb``, ``grayscale`` or ``rgba``.
        label_mode: (with ``directory``) ``int`` class ids or ``categorical`` (one-hot).
        interpolation: (with ``directory``) how images are resized (PIL's: ``bilinear``,
            ``nearest``, ``bicubic``, ...).
        split_seed: (with ``directory`` and a fraction) which files are held out.
        memory_mb: decoded inputs (float32) above this many MB stream from disk instead of
            sitting in memory; None: ``$SEARCHLAB_DATA_MEMORY_MB`` (default 2048).
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
    directory: str | None = None
    validation_directory: str | None = None
    image_size: tuple[int, int] = (256, 256)
    color_mode: str = "rgb"
    label_mode: str = "int"
    interpolation: str = "bilinear"
    split_seed: int = 0
    memory_mb: int | None = None

    def __post_init__(self) -> None:
        # Normalise to hashable values so a Dataset can key the per-process cache.
        for name in ("directory", "validation_directory"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if isinstance(self.image_size, list | tuple):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if isinstance(self.subset, Mapping):
            object.__setattr__(self, "subset", tuple(sorted(self.subset.items())))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))

    def check(self) -> None:
        given = [self.name is not None, self.loader is not None, self.directory is not None]
        if sum(given) != 1:
            raise DataError("A Dataset needs exactly one of name=, loader= or directory=.")
        if self.directory is not None:
            self._check_folder()
        elif self.validation_directory is not None:
            raise DataError("validation_directory= goes with directory= (an image folder).")
        if self.memory_mb is not None and (
            isinstance(self.memory_mb, bool)
            or not isinstance(self.memory_mb, int)
            or self.memory_mb < 0
        ):
            raise DataError(f"memory_mb must be an int >= 0 (MB), got {self.memory_mb!r}.")
        if self.name is not None and self.name not in _KNOWN and Path(self.name).is_dir():
            raise DataError(
                f"{self.name!r} is a folder, not a named dataset: for a folder of images with "
                f"one subfolder per class write Dataset(directory={self.name!r}, "
                "image_size=(224, 224), validation=0.2)."
            )
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

    def _check_folder(self) -> None:
        size = self.image_size
        if (
            not isinstance(size, tuple)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise DataError(f"image_size must be (height, width) in pixels, got {size!r}.")
        if self.color_mode not in COLOR_MODES:
            raise DataError(
                f"color_mode must be one of {', '.join(COLOR_MODES)}, got {self.color_mode!r}."
            )
        if self.label_mode not in LABEL_MODES:
            raise DataError(
                f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}."
            )
        if self.validation == "test" and self.validation_directory is None:
            raise DataError(
                f"Image folder {self.directory!r} has no test split: give validation=0.2 (a "
                "fraction of its images) or validation_directory='...'."
            )

    def _subset(self) -> dict[str, int]:
        if self.subset is None:
            return {}
        if isinstance(self.subset, int):
            return {"train": self.subset}
        return dict(self.subset)

    @property
    def label(self) -> str:
        if self.directory is not None:
            return Path(self.directory).name or str(self.directory)
        return self.name or str(getattr(self.loader, "__name__", "loader"))


@dataclass(frozen=True)
class Data:
    """Arrays ready for ``model.fit``: training, validation and test splits.  ``y_*`` are
    labels as ``fit`` takes them: an array, or a dict / list / tuple of arrays (several
    outputs).  ``num_classes``: None where the labels are not classes (regression targets,
    several outputs)."""

    x_train: np.ndarray  # or a DiskArray: inputs that stream from disk
    y_train: Any
    x_val: np.ndarray
    y_val: Any
    x_test: np.ndarray
    y_test: Any
    num_classes: int | None
    source: str = ""
    #: an image folder's class names, by class id (None: not an image folder)
    class_names: tuple[str, ...] | None = None
    _fingerprint: list[str] = field(default_factory=list, repr=False, compare=False)
    _digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def streamed(self) -> bool:
        """Whether the inputs stream from disk (``DiskArray``) instead of sitting in memory."""
        return isinstance(self.x_train, DiskArray)

    @property
    def own_batches(self) -> bool:
        """Whether a model trains on these inputs through ``batches`` (searchlab's seeded
        batches) instead of ``fit``'s own: inputs that stream from disk, and an image
        folder's also when they fit in memory, so both give the same trials."""
        return self.streamed or self.class_names is not None

    @property
    def fingerprint(self) -> str:
        """A hash of every array: the same data gives the same fingerprint in any process."""
        if not self._fingerprint:
            h = hashlib.sha1()
            arrays = [self.x_train, *leaves(self.y_train), self.x_val, *leaves(self.y_val)]
            for arr in arrays:
                _hash_array(h, arr)
            self._fingerprint.append(h.hexdigest()[:16])
        return self._fingerprint[0]

    def digest(self, split: str) -> str:
        """A hash of one split's arrays (``train``, ``val`` or ``test``), as ``fingerprint``
        is of the training and validation data together (an MLflow dataset's digest)."""
        if split not in self._digests:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            h = hashlib.sha1()
            for arr in (x, *leaves(y)):
                _hash_array(h, arr)
            self._digests[split] = h.hexdigest()[:16]
        return self._digests[split]


def _hash_array(h: Any, arr: Any) -> None:
    if isinstance(arr, DiskArray):  # not read back: its content's hash, taken when written
        h.update(f"{arr.shape}disk{arr.digest}".encode())
        return
    h.update(str(arr.shape).encode() + str(arr.dtype).encode())
    h.update(np.ascontiguousarray(arr).tobytes())


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
    class_names: tuple[str, ...] | None = None
    recipe: str | None = None  # a folder: its files and settings stand for its arrays
    num_classes: int | None
    bound = (dataset.memory_mb if dataset.memory_mb is not None else config.data_memory_mb()) << 20
    held_out: tuple[Any, Any] | None = None  # a loader's or folder's own validation split
    if dataset.directory is not None:
        x_train, y_train, x_val0, y_val0, class_names, source, recipe = _load_folder(dataset, root)
        held_out = (x_val0, y_val0)
        x_test, y_test = x_val0, y_val0  # a folder has no test split: validation stands in
        num_classes = len(class_names)
    elif dataset.loader is not None:
        try:
            raw = dataset.loader()
            if _datasets(raw):
                (x_train, y_train), held_out = _read_datasets(dataset, raw, bound)
                recipe = "/".join(
                    _rows_digest(*split) for split in ((x_train, y_train), held_out) if split
                )
                x_test, y_test = held_out or (_rows(x_train, slice(0)), take(y_train, slice(0)))
            else:
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
        if held_out is not None:
            held_out = _keep_classes(dataset.label, *held_out, dataset.classes)
        if class_names is not None:
            class_names = tuple(class_names[c] for c in dataset.classes)
        num_classes = len(dataset.classes)
    if dataset.one_hot or dataset.label_mode == "categorical":
        if held_out is not None:
            held_out = (
                held_out[0],
                _one_hot(dataset.label, held_out[1], held_out[1], num_classes)[0],
            )
        y_train, y_test, num_classes = _one_hot(dataset.label, y_train, y_test, num_classes)
    if held_out is not None:  # the folder's split, or the loader's own validation dataset
        x_val, y_val = held_out
    elif dataset.validation == "test":
        x_val, y_val = x_test, y_test
    else:
        n_val = max(1, int(round(len(x_train) * float(dataset.validation))))
        x_val, y_val = _rows(x_train, slice(-n_val, None)), take(y_train, slice(-n_val, None))
        x_train, y_train = _rows(x_train, slice(None, -n_val)), take(y_train, slice(None, -n_val))
    sub = dataset._subset()
    x_train, y_train = (
        _rows(x_train, slice(sub.get("train"))),
        take(y_train, slice(sub.get("train"))),
    )
    x_val, y_val = _rows(x_val, slice(sub.get("val"))), take(y_val, slice(sub.get("val")))
    x_test, y_test = _rows(x_test, slice(sub.get("test"))), take(y_test, slice(sub.get("test")))
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
        class_names=class_names,
        **(_recipe_digests(recipe, dataset) if recipe is not None else {}),
    )


def _recipe_digests(recipe: str, dataset: Dataset) -> dict[str, Any]:
    """A folder's (or a dataset loader's) fingerprint and split digests from its files (the
    rows as read) and the Dataset's settings, not from the arrays in use: the same whether
    they sit in memory or stream from disk (the bound is no part of them), and no pass over
    the decoded gigabytes."""
    settings = repr(
        dataclasses.replace(
            dataset, memory_mb=None, directory=None, validation_directory=None, loader=None
        )
    )
    settings += repr(dataset.validation_directory is None)

    def digest(part: str) -> str:
        return hashlib.sha1(f"{recipe}|{settings}|{part}".encode()).hexdigest()[:16]

    digests = {split: digest(split) for split in ("train", "val", "test")}
    return {"_fingerprint": [digest("all")], "_digests": digests}


def _datasets(raw: Any) -> bool:
    """Whether a loader returned a dataset object, or a pair of them."""
    if is_dataset(raw):
        return True
    return (
        isinstance(raw, tuple | list)
        and len(raw) == 2
        and all(not isinstance(r, tuple | list | Mapping | np.ndarray) for r in raw)
        and all(is_dataset(r) for r in raw)
    )


def _rows_digest(x: Any, y: Any) -> str:
    """A hash of rows as a dataset gave them (the same in memory and on disk) and labels."""
    h = hashlib.sha1()
    if isinstance(x, DiskArray):
        h.update(x._content.encode())
    else:
        h.update(hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16].encode())
    h.update(f"{x.shape}{x.dtype if not isinstance(x, DiskArray) else x.file_dtype}".encode())
    for arr in leaves(y):
        _hash_array(h, arr)
    return h.hexdigest()[:24]


def _read_datasets(
    dataset: Dataset, raw: Any, bound: int
) -> tuple[tuple[Any, Any], tuple[Any, Any] | None]:
    """The training rows, and the validation rows when the loader gave its own."""
    label = dataset.label
    if is_dataset(raw):
        if dataset.validation == "test":
            raise DataError(
                f"The data loader {label!r} returns one dataset: give Dataset(validation=0.2) "
                "to hold out a fraction of it, or return a pair (train, validation)."
            )
        return _read_dataset(label, raw, bound), None
    train, val = raw
    n_train = _read_dataset(label, train, bound)
    return n_train, _read_dataset(label, val, bound)


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
        return _rows(x, mask), kept.reshape((-1, *y.shape[1:]))
    if _rows_of_0_1(y) and max(classes) < y.shape[1]:  # one-hot: keep those columns
        mask = y[:, list(classes)].any(axis=1) & (y.sum(axis=1) == 1)
        return _rows(x, mask), y[mask][:, list(classes)]
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


def _scale(x: Any) -> Any:
    if isinstance(x, DiskArray):
        return x.scaled(True)
    if x.dtype == np.uint8:
        return x.astype("float32") / 255.0
    return x.astype("float32")


def _as_float(x: Any) -> Any:
    if isinstance(x, DiskArray):
        return x.scaled(False)
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
    #: an image folder's class names, by class id (None: not an image folder)
    class_names: tuple[str, ...] | None = None


def info_of(data: Data) -> DataInfo:
    return DataInfo(
        input_shape=data.input_shape, num_classes=data.num_classes, class_names=data.class_names
    )


def class_names_json(names: tuple[str, ...] | list[str]) -> str:
    """Class names by class id, as the ``searchlab.class_names`` tag and the file beside an
    exported model hold them (a JSON list)."""
    return json.dumps(list(names))


def head(x: Any, n: int = 64) -> Any:
    """``x`` itself when it is in memory; the first ``n`` rows of inputs on disk."""
    return x[:n] if isinstance(x, DiskArray) else x


def classes_tag(num_classes: int | None) -> str:
    """``num_classes`` as the ``searchlab.num_classes`` tag holds it (``none``: not classes)."""
    return "none" if num_classes is None else str(num_classes)


def classes_from_tag(value: str | None) -> int | None:
    """The tag ``classes_tag`` wrote, back as ``num_classes``."""
    return int(value) if value and value.isdigit() else None


# -- data larger than memory: rows on disk, read a batch at a time ---------------------------


class DiskArray:
    """Rows of a raw file on disk, read on demand: ``x[i:j]`` (or an index array) reads those
    rows into a new float32 array (uint8 pixels divided by 255 when ``scale``).  Reads go
    through ``readinto``, not a memory map, so the rows read do not stay in the process's
    resident memory; the page cache keeps them for the next epoch when there is room.

    ``view(index)`` is another ``DiskArray`` over some of the rows (a split, a subset).
    ``digest`` identifies the content (a hash of the bytes as they were written, and the
    rows and scaling in use), for ``Data.fingerprint``.
    """

    def __init__(
        self,
        path: Path,
        dtype: Any,
        row_shape: tuple[int, ...],
        rows: np.ndarray,
        digest: str,
        *,
        scale: bool = False,
        owner: Any = None,
    ) -> None:
        self.path = Path(path)
        self._owner = owner  # a temporary file's owner: the file goes when no view is left
        self.file_dtype = np.dtype(dtype)
        self.row_shape = tuple(int(v) for v in row_shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._content = digest
        self.scale = scale
        self.row_bytes = int(np.prod(self.row_shape)) * self.file_dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("float32")

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def nbytes(self) -> int:
        """The bytes these rows take once read (float32)."""
        return len(self.rows) * int(np.prod(self.row_shape)) * 4

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def digest(self) -> str:
        h = hashlib.sha1(self._content.encode())
        h.update(self.rows.tobytes())
        h.update(b"scaled" if self.scale else b"raw")
        return h.hexdigest()[:16]

    def view(self, index: Any) -> DiskArray:
        rows = self.rows[index]
        return DiskArray(
            self.path,
            self.file_dtype,
            self.row_shape,
            rows,
            self._content,
            scale=self.scale,
            owner=self._owner,
        )

    def scaled(self, scale: bool) -> DiskArray:
        out = self.view(slice(None))
        out.scale = scale
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self._read(self.rows[[int(index)]])[0]
        return self._read(self.rows[index])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise DataError(
            f"{len(self)} rows of {self.path.name} stream from disk and are not read into "
            "memory at once; raise the memory bound ($SEARCHLAB_DATA_MEMORY_MB) to load them."
        )

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), self.file_dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), self.row_bytes)
        with open(self.path, "rb", buffering=0) as f:
            start = 0
            while start < len(rows):  # one read per run of consecutive rows
                end = start + 1
                while end < len(rows) and rows[end] == rows[end - 1] + 1:
                    end += 1
                f.seek(int(rows[start]) * self.row_bytes)
                view = memoryview(flat[start:end]).cast("B")  # type: ignore[arg-type]
                got = f.readinto(view)
                if got != len(view):
                    raise DataError(f"{self.path} is cut short: delete it and run again.")
                start = end
        if self.scale and self.file_dtype == np.uint8:
            return out.astype("float32") / 255.0
        return out.astype("float32")


def _rows(x: Any, index: Any) -> Any:
    """Some rows of inputs: a ``DiskArray`` view, or ``x[index]``."""
    if isinstance(x, DiskArray):
        if isinstance(index, np.ndarray) and index.dtype == bool:
            index = np.flatnonzero(index)
        return x.view(index)
    return x[index]


class _RowWriter:
    """Collects rows of one split, in memory until their float32 size passes ``bound``
    bytes, then in a raw file under the data cache folder (``config.data_cache_dir``)."""

    def __init__(self, bound: int, path: Path | None = None) -> None:
        self.bound = bound
        self.chunks: list[np.ndarray] = []
        self.count = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.path = path
        self.file: Any = None
        self.owner: _TempFile | None = None
        self.hash = hashlib.sha1()

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x)
        if self.row_shape is None:
            self.row_shape, self.dtype = tuple(x.shape[1:]), x.dtype
        elif tuple(x.shape[1:]) != self.row_shape or x.dtype != self.dtype:
            raise DataError(
                f"Inputs change shape or type from one batch to the next ({self.row_shape} "
                f"{self.dtype} then {tuple(x.shape[1:])} {x.dtype}): give every input one "
                "shape (e.g. image_size=)."
            )
        self.count += len(x)
        self.hash.update(x.tobytes())
        if self.file is None and self.count * int(np.prod(self.row_shape)) * 4 > self.bound:
            self._spill()
        if self.file is not None:
            self.file.write(x.tobytes())
        else:
            self.chunks.append(x)

    def _spill(self) -> None:
        from searchlab import config

        folder = config.data_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if self.path is None:
            fd, name = tempfile.mkstemp(dir=folder, prefix=f"rows-{os.getpid()}-", suffix=".raw")
            self.file, self.path = os.fdopen(fd, "wb"), Path(name)
            self.owner = _TempFile(self.path)  # a loader's rows: this process only
        else:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        for chunk in self.chunks:
            self.file.write(chunk.tobytes())
        self.chunks = []

    def finish(self, empty_shape: tuple[int, ...] = ()) -> Any:
        """The rows: an array in memory, or a ``DiskArray`` over the file."""
        if self.file is None:
            if not self.chunks:
                return np.zeros((0, *empty_shape), self.dtype or "float32")
            return np.concatenate(self.chunks)
        self.file.close()
        assert self.row_shape is not None and self.path is not None
        return DiskArray(
            self.path,
            self.dtype,
            self.row_shape,
            np.arange(self.count),
            self.hash.hexdigest()[:16],
            owner=self.owner,
        )


class _TempFile:
    """Deletes its file once garbage (every ``DiskArray`` over it gone) or at exit."""

    def __init__(self, path: Path) -> None:
        weakref.finalize(self, _unlink, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def batches(
    x: Any, y: Any, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Any:  # a keras.utils.PyDataset
    """``(x, y)`` as a ``keras.utils.PyDataset`` of ``batch_size`` rows, read a batch at a
    time (``x`` a ``DiskArray`` or an array): what ``fit`` trains on for inputs that stream
    from disk.  ``shuffle``: each epoch visits the rows in another order, drawn from
    ``seed`` and the epoch's number (the same on every backend)."""
    return _batches_class()(x, y, batch_size, shuffle, seed)


@functools.cache
def _batches_class() -> type:
    import keras  # heavy: only when data streams

    class Batches(keras.utils.PyDataset):
        def __init__(self, x: Any, y: Any, batch_size: int, shuffle: bool, seed: int) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.x, self.y, self.batch_size = x, y, int(batch_size)
            self.shuffle, self.seed, self.epoch = shuffle, seed, 0
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if not self.shuffle:
                return np.arange(len(self.x))
            return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

        def __len__(self) -> int:
            return -(-len(self.x) // self.batch_size)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
            if self.shuffle:  # read in file order, hand out in the drawn order
                sort = np.argsort(rows, kind="stable")
                x = np.empty((len(rows), *self.x.shape[1:]), "float32")
                x[sort] = self.x[rows[sort]]
            else:
                x = self.x[rows[0] : rows[-1] + 1] if len(rows) else self.x[rows]
            return x, take(self.y, rows)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return Batches


# -- loaders that return a tf.data.Dataset or a keras.utils.PyDataset ------------------------


def is_dataset(obj: Any) -> bool:
    """A ``tf.data.Dataset`` (it has ``as_numpy_iterator``) or a ``keras.utils.PyDataset``."""
    if hasattr(obj, "as_numpy_iterator") and hasattr(obj, "element_spec"):
        return True
    if isinstance(obj, np.ndarray | list | tuple | Mapping):
        return False
    import keras

    return isinstance(obj, keras.utils.PyDataset)


def _dataset_batches(label: str, ds: Any) -> Any:
    """The batches of a user's dataset as NumPy ``(x, y)``: a tf.data dataset's elements (a
    batched one's batches; an unbatched one's examples, grouped), a PyDataset's items."""
    if hasattr(ds, "as_numpy_iterator"):
        spec = ds.element_spec
        first = spec[0] if isinstance(spec, tuple) else spec
        shape = getattr(first, "shape", None)
        batched = shape is not None and len(shape) > 0 and shape[0] is None
        items: Any = ds.as_numpy_iterator()
    else:
        batched, items = True, (ds[i] for i in range(len(ds)))
    group: list[tuple[Any, Any]] = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            n = len(item) if isinstance(item, tuple | list) else 1
            raise DataError(
                f"The data loader {label!r} gives a dataset whose elements hold {n} "
                "value(s); searchlab takes (inputs, labels) pairs: map it to (x, y) "
                "(sample weights are not supported)."
            )
        x, y = np.asarray(item[0]), _labels(item[1])
        if batched:
            yield x, y
            continue
        group.append((x, y))
        if len(group) == 256:
            yield _stack(group)
            group = []
    if group:
        yield _stack(group)


def _stack(group: list[tuple[Any, Any]]) -> tuple[np.ndarray, Any]:
    x = np.stack([g[0] for g in group])
    ys = [g[1] for g in group]
    if isinstance(ys[0], Mapping):
        return x, {k: np.stack([y[k] for y in ys]) for k in ys[0]}
    return x, np.stack(ys)


def _read_dataset(label: str, ds: Any, bound: int) -> tuple[Any, Any]:
    """A user's dataset read once, unbatched: inputs in memory, or on disk past ``bound``
    bytes (float32); labels in memory, structure kept."""
    writer = _RowWriter(bound)
    ys: list[Any] = []
    for x, y in _dataset_batches(label, ds):
        for arr in leaves(y):
            if arr.ndim == 0 or len(arr) != len(x):
                raise DataError(
                    f"The data loader {label!r} gives batches of {len(x)} inputs with labels "
                    f"of another length: give one label (row) per input."
                )
        writer.add(x)
        ys.append(y)
    if not ys:
        raise DataError(f"The data loader {label!r} gives an empty dataset.")
    if isinstance(ys[0], Mapping):
        y_all: Any = {k: np.concatenate([y[k] for y in ys]) for k in ys[0]}
    elif isinstance(ys[0], list | tuple):
        y_all = type(ys[0])(np.concatenate(parts) for parts in zip(*ys, strict=True))
    else:
        y_all = np.concatenate(ys)
    return writer.finish(), y_all


# -- image folders: one subfolder per class ---------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
LABEL_MODES = ("int", "categorical")
COLOR_MODES = {"rgb": 3, "grayscale": 1, "rgba": 4}


def _resolve_folder(given: str, root: str | None) -> Path:
    """A folder as the study names it: as given (relative to the working directory), else
    relative to the data directory."""
    path = Path(given).expanduser()
    if path.is_dir() or path.is_absolute() or root is None:
        return path
    beside = Path(root) / path
    return beside if beside.is_dir() else path


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (its subfolders too), sorted by relative path."""
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(base) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def list_folder(
    directory: Path, class_names: tuple[str, ...] | None = None
) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """The class names (sorted subfolder names, as ``keras.utils.image_dataset_from_directory``
    names them) and each image file with its class id.  ``class_names``: those of the
    training folder, which a validation folder must use too."""
    if not directory.is_dir():
        raise DataError(
            f"Image folder {directory} not found: give Dataset(directory=...) a folder with "
            "one subfolder of images per class (relative to the working directory or the "
            "data directory)."
        )
    names = tuple(sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name[0] != "."))
    if not names:
        raise DataError(
            f"Image folder {directory} has no class subfolders: put each class's images in "
            "a subfolder named after the class (photos/cats/..., photos/dogs/...)."
        )
    if class_names is not None:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise DataError(
                f"Validation folder {directory} has classes the training folder lacks: "
                f"{', '.join(extra)}. Give both folders the same class subfolders."
            )
    files: list[tuple[Path, int]] = []
    for name in names:
        found = _image_files(directory / name)
        if not found:
            raise DataError(
                f"Class folder {directory / name} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder."
            )
        label = (class_names or names).index(name)
        files.extend((path, label) for path in found)
    return (class_names or names), files


def in_validation(relative: str, fraction: float, seed: int) -> bool:
    """Whether the file at ``relative`` (its path in the folder, ``/``-separated) is held out
    for validation: decided by a hash of the path and the seed alone, so the same files are
    held out on every run and every worker, whatever else the folder holds."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _decode(path: Path, size: tuple[int, int], color_mode: str, interpolation: str) -> np.ndarray:
    import keras  # PIL through Keras: the same on every backend

    image = keras.utils.load_img(
        path, color_mode=color_mode, target_size=size, interpolation=interpolation
    )
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _folder_key(files: list[tuple[Path, int]], dataset: Dataset) -> str:
    h = hashlib.sha1()
    h.update(repr((dataset.image_size, dataset.color_mode, dataset.interpolation)).encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    return h.hexdigest()[:24]


def _files_digest(files: list[tuple[Path, int]], folder: Path) -> str:
    """A hash of the files' bytes, their paths in the folder and labels: the same on every
    machine holding the same images, wherever the folder is and whatever its files' times."""
    h = hashlib.sha1()
    for path, label in files:
        h.update(f"{path.relative_to(folder).as_posix()}|{label}|".encode())
        h.update(hashlib.sha1(path.read_bytes()).digest())
    return h.hexdigest()[:24]


def _decode_folder(
    label: str, files: list[tuple[Path, int]], dataset: Dataset, bound: int, where: Path
) -> tuple[Any, np.ndarray]:
    """Decode ``files`` at the study's image size: a uint8 array in memory, or -- decoded
    float32 size above ``bound`` -- a ``DiskArray`` over a file in the data cache folder,
    reused by later runs and other workers while the images are unchanged.  Unreadable
    images are skipped, with one warning line that counts them."""
    h, w = dataset.image_size
    channels = COLOR_MODES[dataset.color_mode]
    row_shape = (h, w, channels)
    size = len(files) * h * w * channels * 4
    key = _folder_key(files, dataset)
    cached = config.data_cache_dir() / f"{key}.u8"
    meta_path = cached.with_suffix(".json")
    if size > bound and cached.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        kept = np.asarray(meta["kept"], dtype=np.int64)
        _warn_skipped(label, where, meta["skipped"])
        x = DiskArray(cached, np.uint8, row_shape, np.arange(len(kept)), meta["digest"])
        return x, np.asarray([files[i][1] for i in kept], dtype="int32")
    writer = _RowWriter(bound if size > bound else size + 1)
    if size > bound:
        config.data_cache_dir().mkdir(parents=True, exist_ok=True)
        writer.path = cached.with_name(f".{key}.{os.getpid()}.tmp")
        writer._spill()
    kept_list: list[int] = []
    skipped: list[list[str]] = []
    for i, (path, _) in enumerate(files):
        try:
            image = _decode(path, (h, w), dataset.color_mode, dataset.interpolation)
        except Exception as exc:  # corrupt, truncated, not an image: skipped and counted
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            why = re.sub(r"\s*<[^>]*>", "", why)[:100]  # PIL names its file object
            skipped.append([path.relative_to(where).as_posix(), why])
            continue
        writer.add(image[None])
        kept_list.append(i)
    _warn_skipped(label, where, skipped)
    if not kept_list:
        raise DataError(f"Image folder {where}: no image could be read.")
    x = writer.finish(row_shape)
    y = np.asarray([files[i][1] for i in kept_list], dtype="int32")
    if isinstance(x, DiskArray):  # publish: a parallel worker never reads half a file
        digest = x._content
        tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps({"kept": kept_list, "skipped": skipped, "digest": digest}))
        os.replace(x.path, cached)
        os.replace(tmp_meta, meta_path)
        x = DiskArray(cached, np.uint8, row_shape, np.arange(len(kept_list)), digest)
    return x, y


def _warn_skipped(label: str, where: Path, skipped: list[list[str]]) -> None:
    if skipped:
        first, why = skipped[0]
        log.warning(
            "Image folder %s: skipped %d unreadable image(s) (first: %s: %s)",
            where,
            len(skipped),
            first,
            why,
        )


def _load_folder(dataset: Dataset, root: str | None) -> tuple[Any, Any, Any, Any, tuple, str, str]:
    """A folder's training and validation images and int labels, its class names, where
    they came from, and a digest of the files and how they are decoded (the same whether
    the images end up in memory or on disk)."""
    assert dataset.directory is not None
    folder = _resolve_folder(dataset.directory, root)
    names, files = list_folder(folder)
    bound = (dataset.memory_mb if dataset.memory_mb is not None else config.data_memory_mb()) << 20
    if dataset.validation_directory is not None:
        val_folder = _resolve_folder(dataset.validation_directory, root)
        _, val_files = list_folder(val_folder, names)
        train_files = files
    else:
        fraction = float(dataset.validation)
        held = [
            in_validation(p.relative_to(folder).as_posix(), fraction, dataset.split_seed)
            for p, _ in files
        ]
        train_files = [f for f, v in zip(files, held, strict=True) if not v]
        val_files = [f for f, v in zip(files, held, strict=True) if v]
        val_folder = folder
        if not val_files or not train_files:
            raise DataError(
                f"Image folder {folder}: validation={dataset.validation} of {len(files)} "
                "images leaves an empty split; add images or change validation=."
            )
    n = len(train_files) + len(val_files)
    # one bound for both splits: each gets its share
    share = lambda k: bound * k // max(1, n)  # noqa: E731
    x_train, y_train = _decode_folder(
        dataset.label, train_files, dataset, share(len(train_files)), folder
    )
    x_val, y_val = _decode_folder(
        dataset.label, val_files, dataset, share(len(val_files)), val_folder
    )
    recipe = f"{_files_digest(train_files, folder)}/{_files_digest(val_files, val_folder)}"
    return x_train, y_train, x_val, y_val, names, str(folder), recipe
