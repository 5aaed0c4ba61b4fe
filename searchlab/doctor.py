"""``searchlab doctor``: what this machine offers a study, checked before any training.

``run_checks`` yields one ``Check`` at a time (the backend first: importing it can take
seconds), so the CLI prints as it goes.  A check whose status is ``FAIL`` is something a run
needs and lacks; the command then exits non-zero.  ``WARN`` is worth knowing but does not stop
a run (a dataset that is not local yet and would be downloaded, say).  Nothing is written:
stores that do not exist yet are reported as such, not created.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchlab import backend, config
from searchlab import data as data_mod
from searchlab.errors import SearchlabError


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    label: str
    status: Status
    detail: str
    #: a ``WARN`` for something a run downloads (fine online, a stop offline)
    downloads: bool = False


def _size(path: Path) -> str:
    n = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def check_backend() -> Iterator[Check]:
    """The backend Keras will load, its version, and the devices it sees."""
    wanted = backend.requested()
    source = "$KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") else "Keras's default"
    if wanted not in backend.BACKENDS:
        yield Check(
            "backend",
            Status.FAIL,
            f"{wanted!r} (from {source}) is not a Keras backend: set KERAS_BACKEND to one of "
            f"{', '.join(backend.BACKENDS)}.",
        )
        return
    version = backend.version(wanted)
    if version is None:
        yield Check(
            "backend",
            Status.FAIL,
            f"{wanted} (from {source}) is not installed: pip install {wanted}, or set "
            f"KERAS_BACKEND to an installed one ({_installed_backends() or 'none installed'}).",
        )
        return
    try:
        loaded = backend.name()
    except Exception as exc:
        yield Check(
            "backend",
            Status.FAIL,
            f"Keras could not load {wanted} {version}: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}",
        )
        return
    yield Check(
        "backend",
        Status.OK,
        f"{loaded} {backend.version(loaded)} (keras {backend.keras_version()}, from {source})",
    )
    try:
        seen = backend.devices()
    except Exception as exc:
        yield Check("devices", Status.FAIL, f"{loaded} cannot list its devices: {exc}")
        return
    notes = []
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        notes.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
    if loaded == "tensorflow" and any(d.kind == "gpu" for d in seen):
        notes.append(f"TF_FORCE_GPU_ALLOW_GROWTH={os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH')}")
    if not any(d.kind in ("gpu", "tpu") for d in seen):
        notes.append("no GPU: trials run on the CPU")
    text = ", ".join(str(d) for d in seen)
    yield Check("devices", Status.OK, text + (f" [{'; '.join(notes)}]" if notes else ""))


def _installed_backends() -> str:
    return ", ".join(b for b in backend.BACKENDS if backend.version(b))


def check_data_dir(explicit: str | None, explicit_source: str = "--data-dir") -> Iterator[Check]:
    """The data directory ``config.find_data_dir`` picks, who named it, and what it holds."""
    found = config.find_data_dir(explicit, explicit_source=explicit_source)
    cache = data_mod.keras_cache_dir()
    if found.problem is not None:
        yield Check("data directory", Status.FAIL, found.problem)
        return
    root = found.path
    if root is None:
        yield Check(
            "data directory",
            Status.OK,
            f"{found.source}; Keras's cache {cache} is used, then keras.datasets downloads",
        )
        return
    known = data_mod.known_files()
    datasets, others = [], []
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        if path.name in known:
            datasets.append(f"{known[path.name]} ({path.name}, {_size(path)})")
        else:
            others.append(f"{path.name} ({_size(path)})")
    text = f"{found.describe()}: " + (", ".join(datasets) if datasets else "no known dataset file")
    if others:
        text += f"; other files: {', '.join(others)}"
    yield Check("data directory", Status.OK, text)


def check_stores(storage: str | None, tracking_uri: str | None) -> Iterator[Check]:
    url = storage or config.default_storage()
    yield _check_optuna(url)
    uri = tracking_uri or config.default_tracking_uri()
    yield _check_mlflow(uri)


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def _unwritable(path: Path) -> Check | None:
    """A FAIL where a store that does not exist yet could not be created."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return None
    return Check(
        "stores",
        Status.FAIL,
        f"{path} cannot be created: {folder} is not a folder you may write to. Set "
        f"{config.HOME_ENV} to one (or pass --storage / --tracking-uri).",
    )


def _check_optuna(url: str) -> Check:
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        return _unwritable(path) or Check(
            "optuna storage", Status.OK, f"{url} (not created yet: a run creates it)"
        )
    from searchlab.store import redact, study_names

    try:
        names = study_names(url)
    except SearchlabError as exc:
        return Check("optuna storage", Status.FAIL, str(exc))
    except Exception as exc:
        return Check(
            "optuna storage",
            Status.FAIL,
            f"{redact(url)} cannot be read: {type(exc).__name__}: {exc}",
        )
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return Check(
        "optuna storage",
        Status.OK,
        f"{redact(url)} ({len(names)} studies{': ' + listed if names else ''})",
    )


def _check_mlflow(uri: str) -> Check:
    path = _sqlite_path(uri)
    artifacts = config.default_artifact_root()
    if path is not None and not path.exists():
        return _unwritable(path) or Check(
            "mlflow tracking",
            Status.OK,
            f"{uri} (not created yet: a run creates it); artifacts in {artifacts}",
        )
    from searchlab import tracking
    from searchlab.store import redact

    try:
        client = tracking.client(uri, create=False)
        n = len(client.search_experiments(max_results=1000))
    except SearchlabError as exc:
        return Check("mlflow tracking", Status.FAIL, str(exc))
    where = f"; artifacts in {artifacts}" if path is not None else ""
    return Check("mlflow tracking", Status.OK, f"{redact(uri)} ({n} experiments{where})")


def check_study(study_file: str, explicit_data_dir: str | None) -> Iterator[Check]:
    """What one study needs: its file loads, its data is there, its strategy can run."""
    from searchlab.study import load_study

    try:
        study = load_study(study_file)
    except SearchlabError as exc:
        yield Check("study", Status.FAIL, str(exc).splitlines()[0])
        return
    yield Check(
        "study",
        Status.OK,
        f"{study.name} from {study_file}: {len(study.search_space.names)} parameters, "
        f"{study.strategy} search, objective {study.objective}",
    )
    dataset = study.dataset
    found = config.find_data_dir(explicit_data_dir)
    root = found.path if found.problem is None else None
    loaded = None
    if dataset.name is not None and data_mod.find_local(dataset.name, root) is None:
        files = data_mod.dataset_files(dataset.name)
        where = root or (
            f"a data directory (--data-dir, ${data_mod.DATA_DIR_ENV} or [tool.searchlab] "
            "data_dir in pyproject.toml)"
        )
        yield Check(
            "study data",
            Status.WARN,
            f"{dataset.name}: no {' / '.join(files)} in {where} nor in Keras's cache; a run "
            f"downloads it with keras.datasets (offline: put {files[0]} in {where}).",
            downloads=True,
        )
    else:
        try:
            loaded = data_mod.load(dataset, root)
        except SearchlabError as exc:
            yield Check("study data", Status.FAIL, str(exc).splitlines()[0])
        else:
            shape = "x".join(str(v) for v in loaded.input_shape)
            yield Check(
                "study data",
                Status.OK,
                f"{dataset.label} from {loaded.source}: {len(loaded.x_train)} train, "
                f"{len(loaded.x_val)} validation, {shape}, "
                + (
                    f"{loaded.num_classes} classes"
                    if loaded.num_classes is not None
                    else "labels that are not classes (targets or several outputs)"
                ),
            )
    if hasattr(study.model, "fetch_weights"):  # models.Transfer: the backbone it will load
        rgb = (224, 224, 3) if loaded is None else tuple(int(v) for v in loaded.input_shape)
        yield check_weights(study.model, rgb)
    if loaded is not None:
        yield check_disk(loaded)
    if study.strategy == "gp" and importlib.util.find_spec("torch") is None:
        yield Check(
            "study strategy",
            Status.FAIL,
            "strategy 'gp' (Optuna's GPSampler) needs PyTorch: pip install 'searchlab[gp]', "
            "or use --strategy bayesian.",
        )


def check_weights(model: Any, shape: tuple[int, ...]) -> Check:
    """The backbone weights a ``Transfer`` model loads: a user's file must exist; ImageNet
    weights are looked for where a run looks (nothing is downloaded here)."""
    from searchlab.models import transfer

    if model.is_file:
        given = Path(model.backbone).expanduser()
        if given.is_file():
            return Check("backbone", Status.OK, f"model file {given} ({_size(given)})")
        return Check(
            "backbone", Status.FAIL, f"model file {given} not found: fix the study file's backbone."
        )
    if model.weights is None:
        return Check(
            "backbone",
            Status.OK,
            f"{model.backbone}, random fixed weights (seed {model.seed}){_from_setting(model)}",
        )
    shape = (model.input_size, model.input_size, 3) if model.input_size else shape
    try:
        path = transfer.resolve_weights(model.backbone, model.weights, shape, model.weights_setting)
    except SearchlabError as exc:
        return Check("backbone", Status.FAIL, str(exc).splitlines()[0])
    if path is not None:
        return Check(
            "backbone",
            Status.OK,
            f"{model.backbone} weights {path} ({_size(path)}){_from_setting(model)}",
        )
    name = transfer.BACKBONES[model.backbone][0]
    return Check(
        "backbone",
        Status.WARN,
        f"{name}'s ImageNet weights are not in {transfer.weights_where()} nor in "
        f"{transfer.keras_models_dir()}: a run downloads them (offline: "
        f"{transfer.weights_fix(model.backbone, shape, model.weights_setting)}).",
        downloads=True,
    )


def _from_setting(model: Any) -> str:
    read = model.weights_setting
    return f", from ${read.name}" if read is not None and read.from_env else ""


#: free space below which the feature cache's disk folder is a warning
LOW_DISK = 1 << 30


def check_disk(loaded: Any) -> Check:
    """Free space where the feature cache writes (``<home>/feature-cache``).  A frozen
    prefix's outputs per example are of the order of the input's float32 size (VGG16's at
    its block 3 on 32x32 images: 5x), so a study needs about that times its rows per cut
    point it caches: warned below 1 GB or below 10x the data's float32 size."""
    import math
    import shutil

    folder = config.home()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    rows = len(loaded.x_train) + len(loaded.x_val)
    data_bytes = rows * math.prod(loaded.input_shape) * 4
    need = max(LOW_DISK, 10 * data_bytes)
    text = (
        f"{free / 2**30:.1f} GB free at {folder}; the data is {data_bytes / 2**20:.0f} MB as "
        "float32 (the feature cache needs a few times that per cached cut point)"
    )
    if free < need:
        return Check(
            "disk",
            Status.WARN,
            f"{text}: under {need / 2**30:.1f} GB, free some space or set {config.HOME_ENV} "
            "to a folder on a bigger disk.",
        )
    return Check("disk", Status.OK, text)


def run_checks(
    study_file: str | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir_source: str = "--data-dir",
) -> Iterator[Check]:
    """Every check, in the order ``searchlab doctor`` prints them; ``data_dir_source``: who
    gave ``data_dir`` (the flag, or the environment variable click read for it)."""
    yield from check_backend()
    yield from check_data_dir(data_dir, data_dir_source)
    yield from check_stores(storage, tracking_uri)
    if study_file is not None:
        yield from check_study(study_file, data_dir)
