"""What a trial's failure means (out of memory, a full disk, the likely fix) and the check
of a study's first model before a session touches any store (``preflight``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend
from searchlab.data import Data, info_of, take
from searchlab.errors import StudyDefinitionError
from searchlab.training import cache
from searchlab.training.build import build_model
from searchlab.training.spec import TrialSpec

log = logging.getLogger("searchlab.trial")  # the name log lines and configs know


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: ``MemoryError``, TensorFlow's
    ``ResourceExhaustedError`` (by name: no TensorFlow import here), or an accelerator's
    message (XLA's ``RESOURCE_EXHAUSTED``, CUDA's "out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    if any(c.__name__ == "ResourceExhaustedError" for c in type(exc).__mro__):
        return True
    return bool(re.search(r"RESOURCE_EXHAUSTED|OOM when allocating|out of memory", str(exc)))


def ensure_space(path: Path, model: Any) -> None:
    """Raise ``OSError(ENOSPC)`` before HDF5 writes ``model`` to ``path`` on a disk without
    room for it.  HDF5 cannot recover from a write the disk refused: the file it leaves
    open makes the process crash when it exits (measured: a segfault after the error)."""
    import errno
    import shutil

    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    variables += list(getattr(optimizer, "variables", []) or [])
    need = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    need = int(need * 1.1) + 2**20  # HDF5's own structure, and room to spare
    if shutil.disk_usage(path.parent).free < need:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk (or a quota) is full: ``ENOSPC``/``EDQUOT``, also where
    HDF5 only names the errno in its message."""
    import errno

    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError) and exc.errno in codes:
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def preflight(spec: TrialSpec, params: Mapping[str, Any]) -> None:
    """Before a session touches any store: build one model (``params``: the space's
    defaults) and check what every trial would otherwise fail on after it was recorded: a
    builder that does not return a compiled Keras 3 model, a model that cannot take the
    labels (with the likely fix), an objective the model does not report.  A builder that
    raises is left to the trials (it may fail for these params only: a trial's failure is
    its own, and the first trials failing alike stop the session).  A transfer builder's
    models are searchlab's own: not built here."""
    if isinstance(spec.build, cache.TransferBuilder):
        return
    info = info_of(spec.data)
    try:
        # on the CPU: the launcher of worker processes must not hold accelerator memory
        with backend.precision_policy(spec.precision), keras.device("cpu:0"):
            model = build_model(spec.build, params, info, compiled=spec.fit is None)
            if spec.fit is not None:
                return  # a HyperModel's own fit decides what it reports
            n = min(8, len(spec.data.x_val))
            x, y = spec.data.x_val[:n], take(spec.data.y_val, slice(n))
            try:
                logs = first_logs(model, x, y)
            except Exception as exc:
                found = hint(exc, model, spec.data)
                if found is None:  # the trials will say what it is
                    log.info("could not evaluate the first model before the search: %s", exc)
                    return
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                raise StudyDefinitionError(
                    f"The model cannot train on this data ({type(exc).__name__}: {first}): {found}."
                ) from None
    except StudyDefinitionError:
        raise
    except Exception as exc:  # (MemoryError too) maybe these params only: the trials will tell
        log.info("could not build the first model before the search: %r", exc)
        return
    finally:
        keras.backend.clear_session(free_memory=False)
    reported = {*logs, *(f"val_{k}" for k in logs), "epoch_s", "learning_rate"}
    if spec.objective not in reported:
        raise StudyDefinitionError(
            f"The objective {spec.objective!r} is not a metric this model reports; it reports "
            f"{', '.join(sorted(reported - {'epoch_s', 'learning_rate'}))}. Set objective= to "
            "one of them (or compile the model with the metric, e.g. metrics=['accuracy'])."
        )


def first_logs(model: Any, x: Any, y: Any) -> dict[str, Any]:
    """What ``evaluate`` reports for the one batch ``x, y``: a test step run eagerly, which
    needs no traced function (a hand-written VGG16's costs ~0.25 s on a 2-core CPU); where
    the eager step fails, the compiled one runs too, and its error is the one trials meet."""
    if not model.run_eagerly:
        model.run_eagerly = True
        try:
            return dict(model.test_on_batch(x, y, return_dict=True))
        except Exception as exc:
            log.debug("the first model's eager test step failed (%r): trying it compiled", exc)
            model.run_eagerly = False
            model.make_test_function(force=True)
    return dict(model.test_on_batch(x, y, return_dict=True))


def _loss_name(model: Any) -> str:
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        return loss
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
    if name is None and loss is not None:
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(loss).__name__).lower()
    return str(name or "")


def _label_kind(y: Any) -> str:
    """``ids`` (int class ids), ``one-hot`` (0/1 rows), ``float`` (targets) or ``other``."""
    if not isinstance(y, np.ndarray):
        return "other"
    if y.dtype.kind in "iub" and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        return "ids"
    if y.ndim == 2 and y.shape[1] > 1 and bool(np.isin(y, (0, 1)).all()):
        return "one-hot"
    return "float" if y.dtype.kind == "f" else "other"


def hint(exc: BaseException, model: Any, data: Data) -> str | None:
    """The likely fix of a trial that failed at build or on its first step, from the error,
    the model's loss and output and the labels; None when nothing here recognises it."""
    text = f"{type(exc).__name__}: {exc}"
    loss = _loss_name(model) if model is not None else ""
    kind = _label_kind(data.y_train)
    classes = data.num_classes
    try:
        width = int(model.outputs[0].shape[-1]) if model is not None else None
    except Exception:  # a subclassed model has no symbolic outputs
        width = None
    if "compile" in text and ("must call" in text or "not compiled" in text):
        return "the model is not compiled: call model.compile(optimizer=..., loss=..., metrics=[...]) in the builder"
    if re.search(
        r"URL fetch failure|urlopen error|name resolution|Failed to connect|HTTP Error", text
    ):
        return (
            "the model downloads files (ImageNet weights?) and cannot reach the internet: put "
            "them in ~/.keras/models/ (or the data directory for Transfer), or use weights=None"
        )
    if re.search(r"OOM|ResourceExhausted|out of memory", text):
        return "the model does not fit in memory: a smaller batch_size or model"
    if "sparse_categorical" not in loss and "categorical_crossentropy" in loss and kind == "ids":
        return (
            "labels are int class ids but the loss is categorical_crossentropy: use "
            "sparse_categorical_crossentropy or Dataset(one_hot=True)"
        )
    if "sparse_categorical" in loss and kind == "one-hot":
        return (
            "labels are one-hot rows but the loss is sparse_categorical_crossentropy: use "
            "categorical_crossentropy"
        )
    if "crossentropy" in loss and kind == "float":
        return (
            f"labels are float targets (regression) but the loss is {loss}: use a regression "
            "loss such as 'mse' or 'mae' and a linear output"
        )
    if "binary_crossentropy" in loss and kind == "ids" and classes is not None and classes > 2:
        return (
            f"labels have {classes} classes but the loss is binary_crossentropy: use "
            f"sparse_categorical_crossentropy and Dense({classes}, activation='softmax')"
        )
    if width is not None and classes is not None and "crossentropy" in loss and width != classes:
        return (
            f"the model outputs {width} values per example but the labels have {classes} "
            "classes: make the last layer Dense(info.num_classes)"
        )
    return None
