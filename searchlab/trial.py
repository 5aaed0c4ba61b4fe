"""Run one trial: build the model, fit it, watch every epoch, keep the best epoch's weights.

This module knows nothing of Optuna or MLflow.  The engine hands it the params and a
callback ``on_epoch(epoch, logs)``; that callback logs the epoch and may raise
``TrialPruned``.  A NaN/inf loss, a builder exception or running out of memory raise
``TrialFailed`` (the study goes on); a study-level mistake (the objective is not a metric the
model reports, the builder does not return a compiled model) raises ``StudyDefinitionError``.

A complete trial leaves its best weights in ``TrialResult.weights_path``: the complete
model's (``WEIGHTS_FILE``) or, for a transfer trial trained entirely on the feature cache,
only the layers after the frozen prefix (``SUFFIX_WEIGHTS_FILE``; tag
``searchlab.weights_form``).  ``load_trained`` rebuilds the complete model from either.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend
from searchlab.data import Data, DataInfo, info_of
from searchlab.errors import StudyDefinitionError, TrialFailed, TrialPruned
from searchlab.outcome import TrialResult, TrialState

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

    def better(self, a: float, b: float | None) -> bool:
        if b is None:
            return True
        return a > b if self.direction == "maximize" else a < b


def build_model(build: Callable[..., Any], params: Mapping[str, Any], info: DataInfo) -> Any:
    """Call a study's builder as ``build(params)`` or ``build(params, info)``."""
    try:
        n_args = len(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        n_args = 1
    model = build(dict(params), info) if n_args >= 2 else build(dict(params))
    if not isinstance(model, keras.Model):
        raise StudyDefinitionError(
            f"The model builder must return a keras.Model, but returned {type(model).__name__}."
        )
    if model.optimizer is None:
        raise StudyDefinitionError(
            "The model builder returned a model that is not compiled: call "
            "model.compile(optimizer=..., loss=..., metrics=['accuracy']) before returning it."
        )
    return model


def _release_previous_trial() -> None:
    """Free what the last trial left (Keras global state, its model's cycles) in ~10 ms.

    A full ``gc.collect()`` walks every object of TensorFlow, MLflow and Optuna (about a
    second per trial on a laptop); after each collection the survivors are long-lived, so
    they are frozen out of later collections, which then only walk the new objects.  The
    first one (~0.3 s) is not skipped: in a notebook the garbage of the user's own models
    would be frozen with the rest and never freed.
    """
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()


def trial_seed(seed: int, number: int) -> int:
    return (seed * 100_003 + number) % (2**31 - 1)


class _Monitor(keras.callbacks.Callback):
    """Per-epoch report, NaN guard and in-memory best-weights checkpoint."""

    def __init__(self, spec: TrialSpec, on_epoch: EpochCallback | None) -> None:
        super().__init__()
        self.spec = spec
        self.on_epoch = on_epoch
        self.target: Any = None  # whose weights to keep: the complete model when fit on a suffix
        self.history: dict[str, list[float]] = {}
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: list[np.ndarray] | None = None
        self.bad_loss: str | None = None
        self.epoch_started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_loss = f"loss became {float(loss)} at batch {batch}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        # wall time of the epoch, validation included (the first one includes compiling)
        logs["epoch_s"] = time.perf_counter() - self.epoch_started
        try:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )
        except Exception:  # an optimizer without a readable rate: skip the metric
            pass
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        if self.spec.objective not in logs:
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
            self.model.stop_training = True
        else:
            value = logs[self.spec.objective]
            if math.isfinite(value) and self.spec.better(value, self.best):
                self.best, self.best_epoch, improved = value, epoch, True
        if self.on_epoch is not None:  # logs the epoch; a pruner raises TrialPruned here
            self.on_epoch(epoch, logs)
        if improved:  # copied once the pruner let the trial go on: a pruned trial keeps none
            self.best_weights = (self.target or self.model).get_weights()


def run_trial(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrialResult:
    """Train one configuration and return its result; never raises for a failed trial.

    Raises only ``StudyDefinitionError`` (the study itself is wrong) and ``KeyboardInterrupt``.
    """
    started = time.perf_counter()
    result = TrialResult(number=number, params=dict(params), state=TrialState.FAILED)
    result.tags.update(backend.run_tags())
    result.tags["searchlab.precision"] = spec.precision
    _release_previous_trial()  # also resets Keras's dtype policy
    keras.utils.set_random_seed(trial_seed(spec.seed, number))
    monitor = _Monitor(spec, on_epoch)
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
    except (StudyDefinitionError, KeyboardInterrupt):
        raise
    except Exception as exc:  # builder errors, OOM, backend errors: this trial only
        result.history = monitor.history
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    finally:
        result.duration = time.perf_counter() - started
    return result


def _build_and_fit(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    monitor: _Monitor,
    result: TrialResult,
) -> None:
    """The part of a trial that runs under its precision policy; fills ``result`` in.

    A transfer trial whose every phase trains on cached features never builds its complete
    model: it trains the builder's suffix model (the layers after the frozen prefix) and
    saves only those weights (``SUFFIX_WEIGHTS_FILE``), which ``load_trained`` puts back
    into the complete model.  Other trials build, train and save the complete model.
    """
    from searchlab import cache as cache_mod

    info = info_of(spec.data)
    build = spec.build
    plan = None
    if _is_phased(build) and build.feature_cache:
        plan = cache_mod.plan_trial(build, params, info, spec.epochs, spec.data,
                                    cache_mod.default_cache())
    # The same seed for the model with and without a plan (planning may build a template).
    keras.utils.set_random_seed(trial_seed(spec.seed, number))
    suffix = None
    if plan is not None:
        suffix = cache_mod.training_suffix(build, params, info, plan)
        model = suffix.model
        result.tags["searchlab.suffix_reused"] = "true" if suffix.reused else "false"
        from searchlab.models.transfer import MATMUL_CONVS

        matmul = getattr(model, MATMUL_CONVS, None)
        if matmul:  # trained as matrix products (MatmulConv2D): same numbers, other rounding
            result.tags["searchlab.matmul_convs"] = ",".join(matmul)
    else:
        model = build_model(build, params, info)
    result.tags.update(_device_tags(model))
    warning = backend.output_dtype_warning(model, spec.precision)
    if warning:
        log.warning("trial %s: %s", number, warning)
    batch_size = int(params.get("batch_size", spec.batch_size))
    fit_started = time.perf_counter()
    try:
        if _is_phased(build):
            monitor.target = model
            _fit_phased(model, params, spec, monitor, batch_size, number, result.tags, plan,
                        suffix)
        else:
            backend.build_for_fit(model, spec.data.x_train, spec.data.y_train, batch_size)
            model.fit(
                spec.data.x_train,
                spec.data.y_train,
                validation_data=(spec.data.x_val, spec.data.y_val),
                epochs=spec.epochs,
                batch_size=batch_size,
                callbacks=[monitor],
                verbose=0,
            )
    except TrialPruned:
        if suffix is not None:
            cache_mod.keep_suffix(suffix)
        raise
    else:  # ended, also on a NaN loss: the next trial resets every variable
        if suffix is not None:
            cache_mod.keep_suffix(suffix)
    finally:
        result.fit_seconds = time.perf_counter() - fit_started
    result.history = monitor.history
    if monitor.bad_loss:
        raise TrialFailed(f"NaN/inf loss: {monitor.bad_loss}")
    if monitor.best_weights is None:
        raise TrialFailed(f"the objective {spec.objective!r} was never finite")
    model.set_weights(monitor.best_weights)
    workdir.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        fingerprint = plan.template.fingerprint(plan.base)
        result.weights_path = workdir / SUFFIX_WEIGHTS_FILE
        cache_mod.save_suffix(model, result.weights_path, plan.base, fingerprint)
        result.tags["searchlab.weights_form"] = "suffix"
        result.tags["searchlab.weights_prefix_layer"] = plan.base.name
        result.tags["searchlab.weights_prefix_fingerprint"] = fingerprint
    else:
        result.weights_path = workdir / WEIGHTS_FILE
        model.save_weights(result.weights_path)
        result.tags["searchlab.weights_form"] = "full"
    result.state = TrialState.COMPLETE
    result.value, result.best_epoch = monitor.best, monitor.best_epoch


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


def _is_phased(build: Any) -> bool:
    """A transfer builder (``cache.TransferBuilder``, e.g. ``searchlab.models.Transfer``): it
    knows its backbone, its training phases and whether the frozen prefix may be cached."""
    from searchlab import cache as cache_mod

    return isinstance(build, cache_mod.TransferBuilder)


def _fit_phased(
    model: Any,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: _Monitor,
    batch_size: int,
    number: int,
    tags: dict[str, str],
    plan: Any = None,
    suffix: Any = None,
) -> None:
    """Fit a transfer model phase by phase (one phase, or head-then-fine-tune), each phase on
    the frozen-prefix feature cache when it can be used; ``tags`` (the trial's MLflow tags)
    say so, also when a phase is pruned or fails.  With a ``plan`` (``cache.Plan``) ``model``
    is ``suffix.model`` (a ``cache.Suffix``), the suffix from the plan's shallowest cut, and
    every phase trains on features (on the suffix's compiled phase models, when it was reused).
    """
    from searchlab import cache as cache_mod

    build = spec.build
    store = cache_mod.default_cache()
    data = spec.data
    used: list[str] = []
    epoch = 0
    if plan is not None:
        phases = plan.phases
    else:
        valid = cache_mod.cut_points(model)  # before any sub-model adds nodes to the layers
        phases = build.schedule(params, model, spec.epochs)
    for phase, (epochs, frozen, lr_factor) in enumerate(phases):
        build.freeze(model, frozen)
        if plan is not None:
            cut = plan.cuts[phase]
            source = plan.template
            feats = store.features(source.model, cut, data, key=source.key(cut, data))
            train, x, x_val = suffix.phase_model(plan, phase), feats.x_train, feats.x_val
        else:
            cut = cache_mod.plan_cut(model, valid) if build.feature_cache else None
            if cut is not None and not store.fits(cut, data):
                cut = None
                tags[f"searchlab.cache_note.{phase}"] = "features larger than the memory bound"
            if cut is None:
                train, x, x_val = model, data.x_train, data.x_val
            else:
                feats = store.features(model, cut, data)
                train, x, x_val = cache_mod.suffix_model(model, cut), feats.x_train, feats.x_val
        if cut is None:
            used.append("off")
        else:
            used.append(f"{cut.name}:{feats.source.value}")
            tags["searchlab.cache_layer"] = cut.name
            tags["searchlab.cache_layer_index"] = str(cut.index)
        tags["searchlab.cache"] = "used" if any(u != "off" for u in used) else "off"
        tags["searchlab.cache_phases"] = ",".join(used)
        tags["searchlab.phases"] = str(len(used))
        reused = suffix is not None and suffix.reused
        if reused:  # compiled by an earlier trial: its traced steps serve this one
            suffix.restart(phase, build.learning_rate(params, lr_factor))
        else:
            build.compile(train, params, lr_factor)
            if cut is not None:
                cache_mod.run_steps_together(train)
        # Reseed right before fit: the same trial shuffles and drops out identically with
        # and without the cache (computing features must not move the random streams).
        keras.utils.set_random_seed(trial_seed(spec.seed, number) + phase)
        if not reused:
            backend.build_for_fit(train, x, data.y_train, batch_size)  # one trace, not two
            if suffix is not None:
                suffix.record(phase)
        if cut is None:
            train.fit(
                x,
                data.y_train,
                validation_data=(x_val, data.y_val),
                initial_epoch=epoch,
                epochs=epoch + epochs,
                batch_size=batch_size,
                callbacks=[monitor],
                verbose=0,
            )
        else:  # small steps on features: fit's input pipeline would cost more than they do
            backend.fit_arrays(
                train, x, data.y_train, (x_val, data.y_val), batch_size=batch_size,
                initial_epoch=epoch, epochs=epoch + epochs, callbacks=[monitor],
            )
        epoch += epochs
        if monitor.bad_loss:
            break


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
    model = build_model(build, params, info)
    if not model.built:  # keras.Sequential() without an Input (KerasTuner's guide) builds on fit
        model.build((None, *info.input_shape))
    if weights.name.endswith(".npz"):
        from searchlab import cache as cache_mod

        cache_mod.load_suffix(model, weights)
        return model
    with warnings.catch_warnings():
        # The file also holds the trained optimizer's slots; a fresh model's optimizer has
        # none yet, which Keras reports. Only the model's weights matter here.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(weights)
    return model
