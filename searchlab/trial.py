"""Run one trial: plan it, build its model, fit it phase by phase, keep the best epoch's weights.

This module knows nothing of Optuna or MLflow.  The engine hands it the params and a
callback ``on_epoch(epoch, logs)``; that callback logs the epoch and may raise
``TrialPruned``.  A NaN/inf loss, a builder exception or running out of memory raise
``TrialFailed`` (the study goes on); a study-level mistake (the objective is not a metric the
model reports, the builder does not return a compiled model) raises ``StudyDefinitionError``.

How a trial runs (``run_trial``, top to bottom):

1. Plan (``_plan``): a ``_Plan`` says what the trial builds, its phases, and what each phase
   trains on.  ``_AutoPlan`` (a ``_PlainPlan``): any study model, as its builder built and
   compiled it, in one phase -- on the raw inputs, or, feature cache on and a frozen prefix
   found (``cache.auto_cut``), its part after the prefix on the prefix's cached features,
   compiled as the model was and fit from where the build left the random streams, as the
   model itself would be; where it finds none, the trial's tag ``searchlab.cache.reason``
   says why.  ``_CompletePlan``: the complete model of a
   ``cache.TransferBuilder``; each phase of its ``schedule`` freezes it and trains it on the
   raw inputs, or -- feature cache on, a frozen prefix found, its features within the memory
   bound -- its part after that prefix on the prefix's cached features.  ``_SuffixPlan``: a
   transfer trial whose every phase has such a prefix (``cache.plan_trial``) builds only the
   layers after the shallowest one (or reuses an earlier trial's compiled ones,
   ``cache.training_suffix``) and trains every phase on features.
2. Seed, build the plan's model.
3. Per phase, in one loop (``_fit_phases``): the plan starts it (freezes, picks the model
   that trains and its inputs) and readies it (compiles, or restarts a reused suffix); the
   trial seeds again, builds that model for fit and fits it -- ``backend.fit_arrays`` on
   features, ``fit`` on raw inputs.  ``_Monitor`` reports each epoch, stops on a NaN/inf loss
   and copies the plan's model's weights at each better epoch.
4. The plan saves those best weights.

A HyperModel with its own ``fit`` (``TrialSpec.fit``) trains the plain plan's model through
it, as KerasTuner's ``Tuner.run_trial`` does: ``fit(hp, model, x, y, validation_data=...,
epochs=..., batch_size=..., callbacks=[the monitor], verbose=0)``; a ``fit`` that passes the
kwargs on to ``model.fit`` reports each epoch, prunes and keeps its best weights as any
trial; one that runs its own loop and returns a float, a dict of metrics or a ``History``
gives the trial its objective (and its epochs, where the return value has them).  With
``TrialSpec.executions`` > 1 the trial fits that many fresh models (KerasTuner's
``executions_per_trial``): each execution's epochs are logged as ``execution_N/<metric>``,
the per-epoch mean under the metric's own name, and the trial's value is the mean of the
executions' best values; the best execution's weights are kept.

The random streams are seeded by ``_seed`` from ``trial_seed(spec.seed, number)`` at two
points: before the model is built (after planning, which may build a template), and right
before each phase that the trial compiled starts training (plus the phase's index), so that
the same trial initializes, shuffles and drops out identically with and without the cache.  A
model its builder compiled trains on from where its build left the streams.

A complete trial leaves its best weights in ``TrialResult.weights_path``: the complete
model's (``WEIGHTS_FILE``) or, for a ``_SuffixPlan`` trial, only the layers after the frozen
prefix (``SUFFIX_WEIGHTS_FILE``; tag ``searchlab.weights_form``).  ``load_trained`` rebuilds
the complete model from either.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import inspect
import logging
import math
import os
import re
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend, cache, checkpoint, interrupts
from searchlab.data import Data, DataInfo, batches, info_of, take
from searchlab.errors import StudyDefinitionError, TrialFailed, TrialPruned
from searchlab.hp import SPLIT_OBJECTIVE
from searchlab.models.transfer import MATMUL_CONVS
from searchlab.outcome import CACHE_REASON_TAG, TrialResult, TrialState

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]
#: a trial's best weights: the complete model's (``full``) ...
WEIGHTS_FILE = "best.weights.h5"
#: ... or, for a trial trained entirely on cached features, only the layers after the frozen
#: prefix plus the prefix's fingerprint (``suffix``; see ``cache.save_suffix``)
SUFFIX_WEIGHTS_FILE = "best.suffix.npz"
WEIGHTS_FILES = (WEIGHTS_FILE, SUFFIX_WEIGHTS_FILE)


@dataclass(frozen=True)
class TrialSpec:
    """Everything about a trial that does not change from one trial to the next."""

    build: Callable[..., Any]
    data: Data
    epochs: int
    objective: str = "val_accuracy"
    direction: str = "maximize"
    batch_size: int = 32
    seed: int = 0
    precision: str = backend.DEFAULT_PRECISION  # a Keras dtype policy, see backend.PRECISIONS
    #: a HyperModel's own fit: ``fit(params, model, x, y, **kwargs)`` (``hp.HpSpace.fit_trial``)
    fit: Callable[..., Any] | None = None
    #: fresh models fit per trial (KerasTuner's ``executions_per_trial``)
    executions: int = 1
    #: a model with more parameters fails its trial before training (KerasTuner's option)
    max_model_size: int | None = None
    #: the folder of this trial's checkpoint (``searchlab.checkpoint``): written after each
    #: epoch, and read first -- a trial that finds one goes on from it; None: no checkpoint
    checkpoint: Path | None = None
    #: False: no trial trains on cached features (the study's ``cache=False``)
    cache: bool = True
    #: seeds the building of a study's own model in every trial (its backbone's random
    #: initialisation, then the same in each trial); the trial's seed drives its fit
    backbone_seed: int | None = None

    def better(self, a: float, b: float | None) -> bool:
        if b is None:
            return True
        return a > b if self.direction == "maximize" else a < b


#: where Keras 2 keeps its models: ``tf_keras`` (``TF_USE_LEGACY_KERAS=1``), TensorFlow's copy
_KERAS_2 = ("tf_keras", "tensorflow.python.keras", "keras.engine", "keras.src.engine")


def build_model(
    build: Callable[..., Any],
    params: Mapping[str, Any],
    info: DataInfo,
    *,
    compiled: bool = True,
) -> Any:
    """Call a study's builder as ``build(params)`` or ``build(params, info)``; ``compiled``:
    refuse a model that is not compiled (a HyperModel's own ``fit`` may train one that is
    not)."""
    try:
        n_args = len(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        n_args = 1
    model = build(dict(params), info) if n_args >= 2 else build(dict(params))
    check_model(model, compiled=compiled)
    return model


def check_model(model: Any, *, compiled: bool = True) -> None:
    """Refuse in one line what a builder returned that searchlab cannot train."""
    if not isinstance(model, keras.Model):
        module = type(model).__module__
        if module.startswith(_KERAS_2):
            raise StudyDefinitionError(
                f"The model builder returned a Keras 2 model ({module}.{type(model).__name__}: "
                "tf_keras, or TF_USE_LEGACY_KERAS=1); searchlab needs Keras 3. Build it with "
                "`import keras` (Keras 3) and unset TF_USE_LEGACY_KERAS."
            )
        if isinstance(model, int | float | np.number) and not isinstance(model, bool):
            raise StudyDefinitionError(
                "The model builder returned a number, as an Optuna objective(trial) does. "
                f"{SPLIT_OBJECTIVE}."
            )
        raise StudyDefinitionError(
            f"The model builder must return a keras.Model, but returned {type(model).__name__}."
        )
    if compiled and getattr(model, "optimizer", None) is None:
        raise StudyDefinitionError(
            "The model builder returned a model that is not compiled: call "
            "model.compile(optimizer=..., loss=..., metrics=['accuracy']) before returning it."
        )


def _release_previous_trial() -> None:
    """Free what the last trial left (Keras global state, its model's cycles) in ~10 ms.

    A full ``gc.collect()`` walks every object of TensorFlow, MLflow and Optuna (about a
    second per trial on a laptop); after each collection the survivors are long-lived, so
    they are frozen out of later collections, which then only walk the new objects.  The
    first one (~0.3 s) is not skipped: in a notebook the garbage of the user's own models
    would be frozen with the rest and never freed (a worker process, which has only
    imported, freezes its objects first: ``freeze_imports``).
    """
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()


def freeze_imports() -> None:
    """In a worker process that has only imported (searchlab, the study file): put every
    object out of the garbage collector's walks, so the first trial's collection
    (``_release_previous_trial``) walks only what the session made since: 0.4 s -> 0.02 s
    on a 2-core CPU.  What garbage the imports left is kept (a few cycles); not for a
    process that ran anything else (a notebook's, a test's): its garbage would be kept too."""
    gc.freeze()


def trial_seed(seed: int, number: int) -> int:
    return (seed * 100_003 + number) % (2**31 - 1)


#: seed offset between the executions of a trial (``executions_per_trial``)
EXECUTION_SEED_STRIDE = 7_919


def _seed(spec: TrialSpec, number: int, phase: int = 0, execution: int = 0) -> None:
    """Seed Python's, NumPy's and the backend's random streams for ``phase`` of trial
    ``number`` (and its ``execution``): the one place a trial seeds them (the module doc
    says when)."""
    offset = phase + EXECUTION_SEED_STRIDE * execution
    keras.utils.set_random_seed(trial_seed(spec.seed, number) + offset)


class _Monitor(keras.callbacks.Callback):
    """Per-epoch report, NaN guard and in-memory best-weights checkpoint."""

    def __init__(
        self, spec: TrialSpec, on_epoch: EpochCallback | None, *, strict: bool = True
    ) -> None:
        super().__init__()
        self.spec = spec
        self.on_epoch = on_epoch
        #: False for a HyperModel's own fit: its return value may hold the objective instead
        self.strict = strict
        self.target: Any = None  # whose weights to keep: the plan's model, also when a part fits
        self.history: dict[str, list[float]] = {}
        self.best: float | None = None
        self.best_epoch: int | None = None
        #: the values of ``kept`` (else of the target's weights) after the best epoch so far
        self.best_weights: list[np.ndarray] | None = None
        #: the target's weights that training may change (``keep``); None: all of them
        self.kept: list[Any] | None = None
        self.bad_loss: str | None = None
        self.epoch_started = time.perf_counter()  # a custom loop may never begin an epoch
        #: writes the trial's checkpoint after each epoch (``_Checkpointer``), if it keeps one
        self.saver: _Checkpointer | None = None

    @property
    def trained(self) -> Any:
        """The model being trained: the one ``fit`` set, else the plan's (a custom loop may
        call the callbacks without ``set_model``)."""
        return self.model if self.model is not None else self.target

    def keep(self, variables: list[Any] | None) -> None:
        """From now on the best epoch's copy holds ``variables`` (a part trained on cached
        features: the frozen prefix never changes) or, with None, all the target's weights.
        Copies taken before this, of fewer variables (an earlier phase froze more), are
        completed from the others' values now: frozen since, they are still those of then."""
        if self.best_weights is not None:
            before = self.kept if self.kept is not None else self._target().weights
            values = {id(v): w for v, w in zip(before, self.best_weights, strict=True)}
            after = variables if variables is not None else self._target().weights
            self.best_weights = [values[id(v)] if id(v) in values else v.numpy() for v in after]
        self.kept = variables

    def copy_best(self) -> None:
        """Copy the kept weights' values: the epoch just ended is the best so far."""
        variables = self.kept if self.kept is not None else self._target().weights
        self.best_weights = [v.numpy() for v in variables]  # copies, as get_weights'

    def put_best(self, model: Any) -> None:
        """Put the best epoch's weights back into ``model`` (the target)."""
        assert self.best_weights is not None
        if self.kept is None:
            model.set_weights(self.best_weights)
            return
        for variable, value in zip(self.kept, self.best_weights, strict=True):
            variable.assign(value)

    def _stop(self) -> None:
        if self.trained is not None:
            self.trained.stop_training = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupts.check()  # a Ctrl-C that Python dropped (in a gc callback) stops it here
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_loss = f"loss became {float(loss)} at batch {batch}"
            self._stop()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        interrupts.check()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        interrupts.check()
        logs = {k: float(v) for k, v in (logs or {}).items()}
        # wall time of the epoch, validation included (the first one includes compiling)
        logs["epoch_s"] = time.perf_counter() - self.epoch_started
        self.epoch_started = time.perf_counter()
        try:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.trained.optimizer.learning_rate)
            )
        except Exception:  # an optimizer without a readable rate: skip the metric
            pass
        self.record(epoch, logs)

    def record(self, epoch: int, logs: dict[str, float], *, weights: bool = True) -> None:
        """Keep one epoch's metrics, report it, and copy the weights when it is the best so
        far (``weights=False``: the epoch is replayed after training; the caller keeps them)."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        if self.spec.objective not in logs and self.strict:
            raise StudyDefinitionError(
                f"The objective {self.spec.objective!r} is not a metric this model reports; "
                f"it reports {', '.join(sorted(logs))}. Set objective= to one of them "
                "(or compile with metrics=['accuracy'] and validation data)."
            )
        loss = logs.get("loss", 0.0)
        if not math.isfinite(loss) and self.bad_loss is None:
            self.bad_loss = f"loss became {loss} in epoch {epoch}"
        improved = False
        if self.bad_loss:
            self._stop()
        else:
            value = logs.get(self.spec.objective, math.nan)
            if math.isfinite(value) and self.spec.better(value, self.best):
                self.best, self.best_epoch, improved = value, epoch + 1, True  # from 1
        copied = False
        if self.saver is not None and weights and not self.bad_loss:
            # the checkpoint is taken before anyone is told of the epoch (see _Checkpointer)
            if improved:
                self.copy_best()
                copied = True
            self.saver.save(self, epoch, improved)
        if self.on_epoch is not None:  # logs the epoch; a pruner raises TrialPruned here
            self.on_epoch(epoch, logs)
        if improved and weights and not copied:  # once the pruner let the trial go on
            self.copy_best()

    def _target(self) -> Any:
        return self.trained if self.target is None else self.target


def run_trial(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrialResult:
    """Train one configuration and return its result; never raises for a failed trial.

    With ``spec.checkpoint`` the trial writes its checkpoint after each epoch and, when the
    folder already holds one, goes on from it (``_Checkpointer``).  A trial that runs out of
    memory before its first epoch is trained again once with half the batch size (tag
    ``searchlab.oom_retry``); when that runs out of memory too, or memory runs out after an
    epoch, it fails with tag ``searchlab.oom`` (not ``early``: not a mistake of the study).

    Raises only ``StudyDefinitionError`` (the study itself is wrong), ``KeyboardInterrupt``
    and an ``OSError`` that says the disk is full (``disk_full``: every trial would fail).
    """
    started = time.perf_counter()
    result = TrialResult(number=number, params=dict(params), state=TrialState.FAILED)
    result.tags.update(backend.run_tags())
    result.tags["searchlab.precision"] = spec.precision
    _release_previous_trial()  # also resets Keras's dtype policy
    interrupts.check()  # the collection above runs callbacks that may drop a Ctrl-C
    saver: _Checkpointer | None = None
    try:
        saver = _Checkpointer.open(spec, params, result)
        if saver is not None and saver.batch_size != batch_size_of(params, spec):
            params, spec = _with_batch_size(params, spec, saver.batch_size)  # an OOM retry's
        for attempt in (1, 2):
            monitor = _Monitor(spec, on_epoch, strict=spec.fit is None)
            monitor.saver = saver
            oom = _attempt(number, params, spec, workdir, monitor, result)
            if oom is None:
                break
            size = batch_size_of(params, spec)
            if attempt == 1 and not monitor.history and size >= 2:
                log.warning(
                    "trial %s: out of memory at batch size %s; trying %s", number, size, size // 2
                )
                result.tags["searchlab.oom_retry"] = f"{size}->{size // 2}"
                params, spec = _with_batch_size(params, spec, size // 2)
                if saver is not None:
                    saver.batch_size = size // 2
                    saver.tags["searchlab.oom_retry"] = result.tags["searchlab.oom_retry"]
                result.error, result.hint, result.early = None, None, False
                result.tags.pop("searchlab.hint", None)
                _release_previous_trial()
                continue
            result.tags["searchlab.oom"] = "true"
            result.early, result.hint = False, None  # the configuration's, not the study's
            result.tags.pop("searchlab.hint", None)
            first = (str(oom).strip().splitlines() or [""])[0][:300]
            result.error = (
                f"out of memory at batch size {size} ({type(oom).__name__}: {first}); "
                "the sampler is told (constraint out_of_memory)"
            )
            break
    except checkpoint.CheckpointError as exc:
        result.error = f"cannot resume from its checkpoint: {exc}"
        result.tags["searchlab.resume_error"] = str(exc)[:500]
    finally:
        if saver is not None:  # the last checkpoint is whole before anyone looks for it
            saver.wait(quiet=True)
        result.duration = time.perf_counter() - started
    return result


def batch_size_of(params: Mapping[str, Any], spec: TrialSpec) -> int:
    """The batch size a trial trains with: its ``batch_size`` param, else the study's."""
    return int(params.get("batch_size", spec.batch_size))


def _with_batch_size(
    params: Mapping[str, Any], spec: TrialSpec, size: int
) -> tuple[Mapping[str, Any], TrialSpec]:
    if "batch_size" in params:
        params = {**params, "batch_size": size}
    return params, dataclasses.replace(spec, batch_size=size)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: ``MemoryError``, TensorFlow's
    ``ResourceExhaustedError`` (by name: no TensorFlow import here), or an accelerator's
    message (XLA's ``RESOURCE_EXHAUSTED``, CUDA's "out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    if any(c.__name__ == "ResourceExhaustedError" for c in type(exc).__mro__):
        return True
    return bool(re.search(r"RESOURCE_EXHAUSTED|OOM when allocating|out of memory", str(exc)))


def _attempt(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    monitor: _Monitor,
    result: TrialResult,
) -> BaseException | None:
    """Build and fit once, filling ``result`` in; return the exception when memory ran out
    (``run_trial`` decides what then)."""
    try:
        with backend.precision_policy(spec.precision):  # the global policy comes back after
            _build_and_fit(number, params, spec, workdir, monitor, result)
    except TrialPruned as exc:
        result.history = monitor.history
        result.state = TrialState.PRUNED
        result.value, result.best_epoch = monitor.best, monitor.best_epoch
        result.error = str(exc)
        result.tags["searchlab.pruned_epoch"] = str(exc.epoch)
    except TrialFailed as exc:
        result.history = monitor.history
        result.error = str(exc)
    except (StudyDefinitionError, KeyboardInterrupt, checkpoint.CheckpointError):
        raise
    except OSError as exc:
        interrupts.check()  # an interrupt that a C extension's call turned into this error
        if disk_full(exc):  # every later trial would fail alike: the study stops here
            raise
        result.history = monitor.history
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    except Exception as exc:  # builder errors, OOM, backend errors: this trial only
        # a KeyboardInterrupt raised inside a C extension's call (TensorFlow's) comes out as
        # a SystemError ("returned a result with an exception set"): the interrupt wins
        interrupts.check()
        result.history = monitor.history
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        result.early = not monitor.history
        if result.early:
            result.hint = hint(exc, monitor.target, spec.data)
            if result.hint:
                result.tags["searchlab.hint"] = result.hint
        if out_of_memory(exc):
            return exc
    return None


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
                logs = _first_logs(model, x, y)
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


def _first_logs(model: Any, x: Any, y: Any) -> dict[str, Any]:
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


def _build_and_fit(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    monitor: _Monitor,
    result: TrialResult,
) -> None:
    """The part of a trial that runs under its precision policy; fills ``result`` in."""
    fit_started = time.perf_counter()
    try:
        if spec.executions == 1:
            plan = _execute(number, params, spec, monitor, result.tags, 0)
        else:
            plan = _executions(number, params, spec, monitor, result.tags)
    finally:
        result.fit_seconds = time.perf_counter() - fit_started
        result.history = monitor.history
    monitor.put_best(plan.model)
    workdir.mkdir(parents=True, exist_ok=True)
    result.weights_path, tags = plan.save(workdir)
    result.tags.update(tags)
    result.state = TrialState.COMPLETE
    result.value, result.best_epoch = monitor.best, monitor.best_epoch


def _execute(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: _Monitor,
    tags: dict[str, str],
    execution: int,
) -> _Plan:
    """Build and fit one model (one execution of the trial) until ``monitor`` holds its best
    weights; raise ``TrialFailed`` when it ended without any."""
    plan = _plan(number, params, spec, execution)
    tags.update(plan.tags)
    tags.update(_device_tags(plan.model))
    warning = backend.output_dtype_warning(plan.model, spec.precision)
    if warning:
        log.warning("trial %s: %s", number, warning)
    monitor.target = plan.model
    try:
        _fit_phases(plan, number, params, spec, monitor, tags, execution)
    except TrialPruned:
        plan.finish()
        raise
    else:  # ended, also on a NaN loss: the next trial resets every variable
        plan.finish()
    if monitor.bad_loss:
        raise TrialFailed(f"NaN/inf loss: {monitor.bad_loss}")
    if monitor.best_weights is None:
        raise TrialFailed(f"the objective {spec.objective!r} was never finite")
    return plan


def _executions(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: _Monitor,
    tags: dict[str, str],
) -> _Plan:
    """KerasTuner's ``executions_per_trial``: fit ``spec.executions`` fresh models, each
    epoch logged as ``execution_N/<metric>``; then the per-epoch mean goes through
    ``monitor`` (logged, reported to the engine), and ``monitor`` ends with the mean of the
    executions' best values and the best execution's weights."""
    on_epoch = monitor.on_epoch
    runs: list[_Monitor] = []
    best: tuple[_Plan, _Monitor] | None = None
    for execution in range(spec.executions):
        if execution:
            _release_previous_trial()
        prefix = f"execution_{execution + 1}/"

        def logged(epoch: int, logs: dict[str, float], prefix: str = prefix) -> None:
            if on_epoch is not None:
                on_epoch(epoch, {prefix + k: v for k, v in logs.items()})

        run = _Monitor(spec, logged, strict=monitor.strict)
        plan = _execute(number, params, spec, run, tags, execution)
        runs.append(run)
        assert run.best is not None
        if best is None or spec.better(run.best, best[1].best):
            best = (plan, run)
    assert best is not None
    epochs = min(len(run.history.get(spec.objective, [])) for run in runs)
    for epoch in range(epochs):
        names = set.intersection(*(set(run.history) for run in runs))
        mean = {k: float(np.mean([run.history[k][epoch] for run in runs])) for k in names}
        monitor.record(epoch, mean, weights=False)
    values = [run.best for run in runs if run.best is not None]
    monitor.best = float(np.mean(values))
    monitor.best_epoch = best[1].best_epoch
    monitor.best_weights, monitor.kept = best[1].best_weights, best[1].kept
    tags["searchlab.executions"] = str(spec.executions)
    tags["searchlab.best_execution"] = str(runs.index(best[1]) + 1)
    tags["searchlab.execution_values"] = ",".join(f"{v:.6g}" for v in values)
    return best[0]


def _plan(number: int, params: Mapping[str, Any], spec: TrialSpec, execution: int = 0) -> _Plan:
    """How the trial trains; seeds, then builds the model it trains (module doc, 1-2)."""
    build, info = spec.build, info_of(spec.data)
    transfer = build if isinstance(build, cache.TransferBuilder) else None
    on_features = None
    if transfer is not None and spec.cache:  # this may build the template, drawing random numbers
        on_features = cache.plan_trial(
            transfer, params, info, spec.epochs, spec.data, cache.default_cache()
        )
    # so after planning: the same streams for a model with and without one
    fixed = spec.backbone_seed is not None and transfer is None
    if fixed:  # every trial initialises the model alike, so its frozen part is the same
        keras.utils.set_random_seed(int(spec.backbone_seed))  # type: ignore[arg-type]
    else:
        _seed(spec, number, execution=execution)
    if transfer is not None and on_features is not None:
        return _SuffixPlan(transfer, params, info, on_features)
    model = build_model(build, params, info, compiled=spec.fit is None)
    if fixed:  # the trial's own streams for its fit (shuffling, dropout)
        _seed(spec, number, execution=execution)
    if spec.max_model_size is not None:
        _check_size(model, info, spec.max_model_size)
    if transfer is None:
        return _AutoPlan(model, spec, info)
    return _CompletePlan(transfer, params, model, spec.epochs, use_cache=spec.cache)


def _check_size(model: Any, info: DataInfo, limit: int) -> None:
    """KerasTuner's ``max_model_size``: a model with more parameters fails its trial."""
    if not model.built:  # keras.Sequential() without an Input builds on fit
        model.build((None, *info.input_shape))
    size = int(model.count_params())
    if size > limit:
        raise TrialFailed(
            f"the model has {size:,} parameters, more than max_model_size={limit:,}: not trained"
        )


def _fit_phases(
    plan: _Plan,
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: _Monitor,
    tags: dict[str, str],
    execution: int = 0,
) -> None:
    """Fit the plan's phases one after the other, each for its epochs (the epoch count goes on
    across phases); ``tags`` say where each phase's inputs came from before it trains, so a
    pruned or failed phase says so too."""
    data = spec.data
    batch_size = batch_size_of(params, spec)
    if spec.fit is not None and isinstance(plan, _PlainPlan):
        _user_fit(plan.model, params, spec, monitor, batch_size)
        return
    sources: list[str] = []
    epoch = 0
    saver = monitor.saver
    resume = saver.state if saver is not None else None
    for phase, (epochs, _, _) in enumerate(plan.phases):
        step = plan.start(phase, data)
        # a part on cached features changes only its own weights: the best epoch's copy
        # need not hold the frozen prefix's (a VGG16's 59 MB, copied at every better epoch)
        monitor.keep(step.model.weights if step.cut is not None else None)
        if step.source is not None:  # a transfer phase: say where its inputs come from
            sources.append(step.source)
            _tag_phase(tags, phase, step, sources)
            tags.update(plan.tags)  # what starting the phase found (a twin reused)
        ready = plan.ready(phase, step)
        if ready not in (_Ready.AS_BUILT, _Ready.TAKEN):
            # Reseed right before fit: the same trial shuffles and drops out identically with
            # and without the cache (computing features must not move the random streams).
            _seed(spec, number, phase, execution)
        if ready not in (_Ready.RESTARTED, _Ready.TAKEN):
            backend.build_for_fit(step.model, step.x, data.y_train, batch_size)  # one trace
            plan.built(phase)
        start = epoch
        if saver is not None:
            saver.track(phase, _saved_variables(plan, step), step.model)
            if resume is not None and phase < resume.phase:  # trained before the checkpoint
                epoch += epochs
                continue
            if resume is not None:  # the checkpoint's phase: on from its epoch
                saver.restore(resume, monitor)
                start, resume = resume.epoch, None
        # on features the steps are small: fit's input pipeline would cost more than they do
        fit = _keras_fit if step.cut is None else backend.fit_arrays
        if step.cut is None and data.own_batches:  # a folder: the same batches in memory or not
            fit = _batches_fit
        if start < epoch + epochs:
            fit(
                step.model,
                step.x,
                data.y_train,
                (step.x_val, data.y_val),
                batch_size=batch_size,
                initial_epoch=start,
                epochs=epoch + epochs,
                callbacks=[monitor],
            )
        epoch += epochs
        if monitor.bad_loss:
            break


#: keyword arguments of searchlab's that a HyperModel's fit may pass to model.fit itself
#: (``epochs=hp.Int("epochs", ...)`` as in KerasTuner's docs): its own value is used
_OURS_TO_DROP = ("batch_size", "epochs", "validation_data", "verbose")


def _user_fit(
    model: Any, params: Mapping[str, Any], spec: TrialSpec, monitor: _Monitor, batch_size: int
) -> None:
    """Train through the HyperModel's own ``fit``, as KerasTuner's ``Tuner.run_trial`` calls
    it: the data as positional arguments, the rest (with the monitor in ``callbacks``) as
    keyword arguments; then take the objective from what it returned where no epoch
    reported it."""
    assert spec.fit is not None
    data = spec.data
    if data.streamed:  # KerasTuner's fit(hp, model, x, y, ...) takes arrays
        raise StudyDefinitionError(
            "The HyperModel's own fit takes arrays, but these images stream from disk (their "
            "decoded size is above the memory bound): raise Dataset(memory_mb=...) or "
            "$SEARCHLAB_DATA_MEMORY_MB, or let searchlab fit the model (drop fit)."
        )
    kwargs: dict[str, Any] = {
        "validation_data": (data.x_val, data.y_val),
        "epochs": spec.epochs,
        "batch_size": batch_size,
        "callbacks": [monitor],
        "verbose": 0,
    }
    monitor.strict = False
    while True:
        try:
            returned = spec.fit(params, model, data.x_train, data.y_train, **kwargs)
            break
        except TypeError as exc:
            match = re.search(r"got multiple values for keyword argument '(\w+)'", str(exc))
            if match is None or monitor.history:
                raise
            name = match.group(1)
            if name in _OURS_TO_DROP and name in kwargs:
                del kwargs[name]  # fit sets it itself (e.g. batch_size=hp.Choice(...))
                continue
            raise StudyDefinitionError(
                f"HyperModel.fit passes {name}= to model.fit and so does searchlab, in kwargs "
                f"(as KerasTuner does): take it from kwargs instead (e.g. "
                f"kwargs['{name}'] for callbacks, adding yours to the list)."
            ) from None
    if monitor.bad_loss or spec.objective in monitor.history:
        return
    _returned_metrics(returned, spec, monitor)


def _returned_metrics(returned: Any, spec: TrialSpec, monitor: _Monitor) -> None:
    """What a HyperModel's fit returned, as KerasTuner reads it: a ``History`` (per epoch), a
    dict of metrics or a number (the objective).  Its epochs are logged after the fact and
    the model's final weights are kept."""
    history = getattr(returned, "history", None)
    if isinstance(history, Mapping) and history:
        epochs = max(len(v) for v in history.values())
        per_epoch = [
            {k: float(v[i]) for k, v in history.items() if i < len(v)} for i in range(epochs)
        ]
    elif isinstance(returned, Mapping):
        per_epoch = [{str(k): float(v) for k, v in returned.items()}]
    elif isinstance(returned, int | float | np.number) and not isinstance(returned, bool):
        per_epoch = [{spec.objective: float(returned)}]
    else:
        raise StudyDefinitionError(
            f"HyperModel.fit returned {type(returned).__name__} and no epoch reported "
            f"{spec.objective!r} to the callbacks in kwargs: return model.fit(...)'s History, a "
            f"dict of metrics or the objective's value, as KerasTuner requires."
        )
    if not any(spec.objective in logs for logs in per_epoch):
        names = sorted({k for logs in per_epoch for k in logs})
        raise StudyDefinitionError(
            f"HyperModel.fit returned {', '.join(names) or 'nothing'} but not the objective "
            f"{spec.objective!r}: return it, or set objective= to one of them."
        )
    first = len(monitor.history.get("loss", [])) if monitor.history else 0
    for offset, logs in enumerate(per_epoch):
        monitor.record(first + offset if len(per_epoch) > 1 else max(first - 1, 0), logs)
    if monitor.best is not None and monitor.best_weights is None:
        monitor.copy_best()


def _keras_fit(
    model: Any,
    x: Any,
    y: Any,
    validation_data: tuple[Any, Any],
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[Any],
) -> None:
    """``model.fit`` with ``backend.fit_arrays``'s signature (inputs that stream from disk
    train through ``_batches_fit``: ``Data.own_batches``)."""
    model.fit(
        x,
        y,
        validation_data=validation_data,
        initial_epoch=initial_epoch,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=callbacks,
        verbose=0,
    )


def _batches_fit(
    model: Any,
    x: Any,
    y: Any,
    validation_data: tuple[Any, Any],
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[Any],
) -> None:
    """``model.fit`` on ``data.batches``: a ``keras.utils.PyDataset`` of ``batch_size`` rows
    (read from disk where they stream), shuffled each epoch from a seed drawn from the
    trial's seeded NumPy stream -- the same batches whether the rows are in memory or not."""
    seed = int(np.random.randint(2**31 - 1))
    model.fit(
        batches(x, y, batch_size, shuffle=True, seed=seed),
        validation_data=batches(*validation_data, batch_size, shuffle=False),
        initial_epoch=initial_epoch,
        epochs=epochs,
        callbacks=callbacks,
        verbose=0,
    )


def _tag_phase(tags: dict[str, str], phase: int, step: _Step, sources: list[str]) -> None:
    """The trial's cache tags once ``phase`` starts (``sources``: each phase's so far)."""
    if step.note:
        tags[f"searchlab.cache_note.{phase}"] = step.note
    if step.cut is not None:
        tags["searchlab.cache_layer"] = step.cut.name
        tags["searchlab.cache_layer_index"] = str(step.cut.index)
    tags["searchlab.cache"] = "used" if any(s != "off" for s in sources) else "off"
    tags["searchlab.cache_phases"] = ",".join(sources)
    tags["searchlab.phases"] = str(len(sources))


def _device_tags(model: Any) -> dict[str, str]:
    """Where this trial trains: the device its weights live on (else the backend's first)."""
    device = backend.device_of(model)
    if device is None:
        try:
            device = backend.devices()[0]
        except Exception:  # a backend that cannot list devices: say so, do not fail the trial
            return {"searchlab.device": "unknown"}
    tags = {"searchlab.device": device.label}
    if device.name:
        tags["searchlab.device_name"] = device.name
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and device.kind == "gpu":
        tags["searchlab.cuda_visible_devices"] = visible
    return tags


# -- checkpoints: go on from the last finished epoch ----------------------------------------


class _Checkpointer:
    """A trial's checkpoint (``searchlab.checkpoint``): written after each epoch it finishes
    (``_Monitor.record``: copied before the epoch is reported, written to disk in a thread
    meanwhile, whole before the next epoch's is copied and before the trial returns), read
    when the trial starts.

    A trial that finds a checkpoint builds its model as a new one would (same seeds, same
    plan, every phase started, compiled and built for fit), skips the phases before the
    checkpoint's without training them, puts the checkpoint's variables (model: weights and
    dropout seed states; optimizer: slots and step count) into the checkpoint's phase's
    model, and fits from the next epoch: the same batches, dropout masks and updates as a
    trial never interrupted (tested bit for bit on TensorFlow).  It then reports the
    checkpoint's epoch once more: a kill may have come between writing the checkpoint and
    reporting that epoch; or after reporting an epoch whose checkpoint was not yet whole,
    which is then trained again to the same numbers.  Either way the runner logs an epoch
    only if MLflow lacks it, and reports it only if Optuna lacks it.  Saved are the
    variables of the model trained on cached features only (the frozen prefix does not
    change), else the plan's whole model; phases are assumed to unfreeze progressively, as a
    ``TransferBuilder``'s schedule does, so the variables of the checkpoint's phase cover
    what earlier phases trained.
    """

    def __init__(self, folder: Path, state: checkpoint.State | None, batch_size: int) -> None:
        self._pending: threading.Thread | None = None  # the file being written, if any
        self._error: BaseException | None = None  # what that write raised
        #: the best-epoch copy in the checkpoint's file: a new one (a better epoch, or a copy
        #: completed by ``_Monitor.keep`` at a phase's start) is written again
        self._written_best: list[np.ndarray] | None = None
        self.folder = folder
        self.state = state  # the checkpoint found at the start, if any
        self.batch_size = batch_size
        self.tags: dict[str, str] = dict(state.tags) if state is not None else {}
        self.phase = 0
        self.variables: list[Any] = []
        self.model: Any = None

    @classmethod
    def open(
        cls, spec: TrialSpec, params: Mapping[str, Any], result: TrialResult
    ) -> _Checkpointer | None:
        """The trial's checkpointer; None when it keeps none (no folder, a HyperModel's
        own fit, several executions).  Raises ``CheckpointError`` for an unreadable one."""
        if spec.checkpoint is None or spec.fit is not None or spec.executions != 1:
            return None
        state = checkpoint.load(spec.checkpoint)
        size = state.batch_size if state is not None else batch_size_of(params, spec)
        saver = cls(spec.checkpoint, state, size)
        if state is not None:
            result.tags.update(state.tags)
            result.tags["searchlab.resumed_epoch"] = str(state.epoch)
            log.info("trial resumed after epoch %s from %s", state.epoch, spec.checkpoint)
        return saver

    def track(self, phase: int, variables: list[Any], model: Any) -> None:
        """``phase`` starts: its checkpoints hold ``variables`` and ``model``'s optimizer."""
        self.phase, self.variables, self.model = phase, variables, model
        optimizer = model.optimizer
        if not optimizer.built:  # fit would build it on its first step; the restore needs it
            optimizer.build(model.trainable_variables)

    def save(self, monitor: _Monitor, epoch: int, improved: bool) -> None:
        """Copy the epoch's state now; write it in a thread while the next epoch trains (a
        VGG block's 110 MB took 7% of its epoch written in line).  The previous file is
        whole first; a write that failed raises here (a full disk stops the study)."""
        self.wait()
        state = checkpoint.State(
            epoch=epoch + 1,
            phase=self.phase,
            batch_size=self.batch_size,
            history={k: list(v) for k, v in monitor.history.items()},
            best=monitor.best,
            best_epoch=monitor.best_epoch,
            variables=checkpoint.read(self.variables),
            optimizer=checkpoint.read(self.model.optimizer.variables),
            best_weights=monitor.best_weights,  # get_weights' own copies, never changed
            tags=dict(self.tags),
        )
        self._pending = threading.Thread(
            target=self._write,
            args=(state, improved or monitor.best_weights is not self._written_best),
            name="searchlab-checkpoint",
            daemon=True,
        )
        self._written_best = monitor.best_weights
        self._pending.start()

    def _write(self, state: checkpoint.State, improved: bool) -> None:
        try:
            checkpoint.save(self.folder, state, best_changed=improved)
        except BaseException as exc:  # raised in the trial's thread by wait()
            self._error = exc

    def wait(self, *, quiet: bool = False) -> None:
        """Until the checkpoint being written is whole; raise what its write raised
        (``quiet``: log it instead -- the trial is over, or stopping)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        error, self._error = self._error, None
        if error is not None:
            if not quiet:
                raise error
            log.warning("a checkpoint could not be written: %s", error)

    def restore(self, state: checkpoint.State, monitor: _Monitor) -> None:
        checkpoint.restore(self.variables, state.variables, "model")
        checkpoint.restore(self.model.optimizer.variables, state.optimizer, "optimizer")
        monitor.history = {k: list(v) for k, v in state.history.items()}
        monitor.best, monitor.best_epoch = state.best, state.best_epoch
        if state.best_weights is not None:  # the kept weights of this phase (Monitor.keep)
            kept = monitor.kept if monitor.kept is not None else monitor.target.weights
            checkpoint.check(kept, state.best_weights, "best-epoch")
        monitor.best_weights = self._written_best = state.best_weights
        if monitor.on_epoch is not None and state.epoch > 0:
            last = {k: v[-1] for k, v in monitor.history.items() if len(v) == state.epoch}
            monitor.on_epoch(state.epoch - 1, last)


def _saved_variables(plan: _Plan, step: _Step) -> list[Any]:
    """What a checkpoint of ``step`` holds: the part trained on cached features (a frozen
    prefix is the same on every start), else the plan's whole model (with the seed states of
    its dropout layers: ``variables``)."""
    if step.cut is not None:
        return list(step.model.variables)
    return list(plan.model.variables)


# -- plans: what a trial builds, and what each phase trains on -----------------------------


@dataclass
class _Step:
    """What one phase fits: ``model`` on ``x`` / ``x_val``, the raw inputs or the features of
    the prefix up to ``cut``.  ``source`` names them for the cache tags (``off``, or
    ``<cut layer>:<memory|disk|computed>``; None: no cache tags), ``note`` why a cut was not
    used."""

    model: Any
    x: Any
    x_val: Any
    cut: cache.Cut | None = None
    source: str | None = "off"
    note: str | None = None


class _Ready(enum.Enum):
    """How a phase's model was readied for fit, which decides what the trial does next."""

    AS_BUILT = "as built"  # compiled by the study's builder: no seed, build for fit
    COMPILED = "compiled"  # compiled for this phase: seed, build for fit
    RESTARTED = "restarted"  # a reused suffix's phase model, restarted: seed; built already
    #: a pooled twin of the model's part, given the part's variables: no seed, built already
    TAKEN = "taken"


class _Plan:
    """How a trial trains: ``model`` (built by ``_plan``; its weights are the trial's),
    ``phases`` as (epochs, frozen, learning-rate factor) and ``tags`` for the trial.

    For each phase in order the trial calls ``start`` (what the phase trains on), then
    ``ready`` (compile it), seeds, builds the phase's model for fit unless restarted and then
    calls ``built``, and fits.  Once the fit ended (also pruned or on a NaN loss) it calls
    ``finish``; with the best weights put back into ``model``, ``save``.
    """

    model: Any
    phases: list[tuple[int, int, float]]
    tags: dict[str, str]

    def start(self, phase: int, data: Data) -> _Step:
        raise NotImplementedError

    def ready(self, phase: int, step: _Step) -> _Ready:
        raise NotImplementedError

    def built(self, phase: int) -> None:
        """The phase's model is built for fit (its optimizer too), not yet trained."""

    def finish(self) -> None:
        """The fit ended: give back what another trial may reuse."""

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        """Save ``model``'s weights in ``workdir``: the file and the tags that describe it."""
        path = workdir / WEIGHTS_FILE
        ensure_space(path, self.model)
        self.model.save_weights(path)
        return path, {"searchlab.weights_form": "full"}


class _PlainPlan(_Plan):
    """Any study model, as its builder built and compiled it: one phase on the raw inputs
    (its frozen count and rate factor unused)."""

    def __init__(self, model: Any, epochs: int) -> None:
        self.model, self.phases, self.tags = model, [(epochs, 0, 1.0)], {}

    def start(self, phase: int, data: Data) -> _Step:
        return _Step(self.model, data.x_train, data.x_val, source=None)

    def ready(self, phase: int, step: _Step) -> _Ready:
        return _Ready.AS_BUILT


class _AutoPlan(_PlainPlan):
    """Any other study model (``build_model(hp)``, a HyperModel, a builder), as its builder
    built and compiled it, in one phase.  With the feature cache on, where ``cache.auto_cut``
    finds a frozen, deterministic prefix, the model's part after it (``cache.suffix_model``:
    the same layers, compiled as the model was) trains on the prefix's cached features, with
    the random streams where the build left them, as the model's own fit would (through a
    pooled ``cache.Twin`` of that part where one can be made: the traced steps of an earlier
    trial whose part differs only in dropout rates and learning rate); the model's
    weights are saved as the suffix's with the prefix's fingerprint (``cache.save_suffix``) once
    a rebuild is known to give the prefix back (``rebuildable``), else whole.
    Otherwise it trains on the raw inputs, and ``tags`` say why (``CACHE_REASON_TAG``)."""

    def __init__(self, model: Any, spec: TrialSpec, info: DataInfo) -> None:
        super().__init__(model, spec.epochs)
        self.store = cache.default_cache()
        self.suffix: Any = None
        #: what trains in the suffix's place (``cache.Twin``), if anything
        self.twin: cache.Twin | None = None
        #: whether a rebuild (export, reeval, the session's best model: built without the
        #: trial's seeds) gives back the frozen prefix, so that its suffix's weights suffice:
        #: only once a second build gave the same prefix (features from memory or disk) and
        #: not from the study's backbone_seed -- random weights otherwise
        self.rebuildable = False
        self.seeded = spec.backbone_seed is not None
        found: cache.AutoCut | cache.NoCut
        if not spec.cache:
            found = cache.NoCut(cache.Reason.DISABLED, "the study sets cache=False")
        elif spec.fit is not None:
            found = cache.NoCut(
                cache.Reason.OWN_FIT, "searchlab cannot train its part after a frozen prefix"
            )
        else:
            try:
                found = cache.auto_cut(
                    model, spec.data, self.store, info.input_shape, scope=spec.backbone_seed
                )
            except Exception as exc:  # a graph Keras cannot read back: train as built
                log.debug("trial model: no cut (%r)", exc, exc_info=True)
                found = cache.NoCut(
                    cache.Reason.NOT_A_GRAPH,
                    f"its layer graph could not be read ({type(exc).__name__}: {exc})",
                )
        self.found = found
        if isinstance(found, cache.NoCut):
            self.tags = {"searchlab.cache": "off", CACHE_REASON_TAG: str(found)}

    def start(self, phase: int, data: Data) -> _Step:
        found = self.found
        if isinstance(found, cache.NoCut):
            return _Step(self.model, data.x_train, data.x_val)
        feats = self.store.features(found.graph, found.cut, data, key=found.key)
        self.rebuildable = feats.source is not cache.Source.COMPUTED and not self.seeded
        self.suffix = cache.suffix_model(found.graph, found.cut)
        self.twin = cache.twin_for(self.suffix, self.model, found.compile_args)
        if self.twin is not None:
            self.tags["searchlab.suffix_reused"] = "true" if self.twin.reused else "false"
        return _Step(
            self.suffix if self.twin is None else self.twin.model,
            feats.x_train,
            feats.x_val,
            found.cut,
            f"{found.cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: _Step) -> _Ready:
        # no reseeding: the streams are where the model's build left them
        if step.cut is None or not isinstance(self.found, cache.AutoCut):
            return _Ready.AS_BUILT
        if self.twin is None:
            cache.compile_like(step.model, self.found)
            cache.run_steps_together(step.model)
            return _Ready.AS_BUILT
        self.twin.take(self.suffix, self.model.optimizer)
        if self.twin.reused:
            return _Ready.TAKEN
        cache.run_steps_together(step.model)
        return _Ready.AS_BUILT

    def built(self, phase: int) -> None:
        if self.twin is not None:
            self.twin.record()

    def finish(self) -> None:
        if self.twin is not None:
            cache.keep_twin(self.twin)

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        if self.twin is not None:  # the twin trained (and holds the best epoch's weights)
            self.twin.give(self.suffix)
        found = self.found
        if self.suffix is None or not isinstance(found, cache.AutoCut) or not self.rebuildable:
            return super().save(workdir)  # the complete model: its prefix comes back as saved
        path = workdir / SUFFIX_WEIGHTS_FILE
        cache.save_suffix(self.suffix, path, found.cut, found.fingerprint)
        return path, {
            "searchlab.weights_form": "suffix",
            "searchlab.weights_prefix_layer": found.cut.name,
            "searchlab.weights_prefix_fingerprint": found.fingerprint,
        }


class _CompletePlan(_Plan):
    """A transfer builder's complete model.  Each phase freezes it and trains it on the raw
    inputs, or, with the feature cache on, its part after the deepest frozen prefix
    (``cache.suffix_model``: the same layers) on the prefix's features, when they fit."""

    def __init__(
        self,
        build: cache.TransferBuilder,
        params: Mapping[str, Any],
        model: Any,
        epochs: int,
        *,
        use_cache: bool = True,
    ) -> None:
        self.build, self.params, self.model = build, params, model
        self.use_cache = use_cache and build.feature_cache
        self.store = cache.default_cache()
        self.valid = cache.cut_points(model)  # before any part of it adds nodes to its layers
        self.phases = build.schedule(params, model, epochs)
        self.tags = {}

    def start(self, phase: int, data: Data) -> _Step:
        self.build.freeze(self.model, self.phases[phase][1])
        cut = cache.plan_cut(self.model, self.valid) if self.use_cache else None
        if cut is not None and not self.store.fits(cut, data):
            return _Step(
                self.model, data.x_train, data.x_val, note="features larger than the memory bound"
            )
        if cut is None:
            return _Step(self.model, data.x_train, data.x_val)
        feats = self.store.features(self.model, cut, data)
        return _Step(
            cache.suffix_model(self.model, cut),
            feats.x_train,
            feats.x_val,
            cut,
            f"{cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: _Step) -> _Ready:
        self.build.compile(step.model, self.params, self.phases[phase][2])
        if step.cut is not None:
            cache.run_steps_together(step.model)
        return _Ready.COMPILED


class _SuffixPlan(_Plan):
    """A transfer trial whose every phase trains on cached features (``cache.Plan``): its
    model is the builder's suffix from the plan's shallowest cut -- new, or a compiled one an
    earlier trial of the same structure gave back -- and only its weights are saved."""

    def __init__(
        self,
        build: cache.TransferBuilder,
        params: Mapping[str, Any],
        info: DataInfo,
        cached: cache.Plan,
    ) -> None:
        self.build, self.params, self.cached = build, params, cached
        self.store = cache.default_cache()
        self.suffix = cache.training_suffix(build, params, info, cached)
        self.model, self.phases = self.suffix.model, cached.phases
        self.tags = {"searchlab.suffix_reused": "true" if self.suffix.reused else "false"}
        matmul = getattr(self.model, MATMUL_CONVS, None)
        if matmul:  # trained as matrix products (MatmulConv2D): same numbers, other rounding
            self.tags["searchlab.matmul_convs"] = ",".join(matmul)

    def start(self, phase: int, data: Data) -> _Step:
        self.build.freeze(self.model, self.phases[phase][1])
        cut, template = self.cached.cuts[phase], self.cached.template
        feats = self.store.features(template.model, cut, data, key=template.key(cut, data))
        return _Step(
            self.suffix.phase_model(self.cached, phase),
            feats.x_train,
            feats.x_val,
            cut,
            f"{cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: _Step) -> _Ready:
        lr_factor = self.phases[phase][2]
        if self.suffix.reused:  # compiled by an earlier trial: its traced steps serve this one
            self.suffix.restart(phase, self.build.learning_rate(self.params, lr_factor))
            return _Ready.RESTARTED
        self.build.compile(step.model, self.params, lr_factor)
        cache.run_steps_together(step.model)
        return _Ready.COMPILED

    def built(self, phase: int) -> None:
        self.suffix.record(phase)

    def finish(self) -> None:
        cache.keep_suffix(self.suffix)

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        base = self.cached.base
        fingerprint = self.cached.template.fingerprint(base)
        path = workdir / SUFFIX_WEIGHTS_FILE
        cache.save_suffix(self.model, path, base, fingerprint)
        return path, {
            "searchlab.weights_form": "suffix",
            "searchlab.weights_prefix_layer": base.name,
            "searchlab.weights_prefix_fingerprint": fingerprint,
        }


def weights_file(path: Path) -> Path:
    """A trial's weights file: ``path`` itself, or the one in folder ``path`` (a downloaded
    ``weights`` artifact folder holds either form)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHTS_FILES)} in {path}")


def load_trained(
    build: Callable[..., Any], params: Mapping[str, Any], info: DataInfo, weights: Path
) -> Any:
    """Rebuild a trial's complete model from its params and load its saved best weights:
    ``weights`` is either weights file (or the folder holding it).  A suffix file is checked
    against the rebuilt model's frozen prefix (``cache.load_suffix``)."""
    weights = weights_file(weights)
    keras.backend.clear_session()
    model = build_model(build, params, info, compiled=False)  # weights only: no training
    if not model.built:  # keras.Sequential() without an Input (KerasTuner's guide) builds on fit
        model.build((None, *info.input_shape))
    if weights.name.endswith(".npz"):
        cache.load_suffix(model, weights)
        return model
    with warnings.catch_warnings():
        # The file also holds the trained optimizer's slots; a fresh model's optimizer has
        # none yet, which Keras reports. Only the model's weights matter here.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(weights)
    return model
