"""Run one trial: plan it, build its model, fit it phase by phase, keep the best epoch's weights.

This module knows nothing of Optuna or MLflow.  The engine hands it the params and a
callback ``on_epoch(epoch, logs)``; that callback logs the epoch and may raise
``TrialPruned``.  A NaN/inf loss, a builder exception or running out of memory raise
``TrialFailed`` (the study goes on); a study-level mistake (the objective is not a metric the
model reports, the builder does not return a compiled model) raises ``StudyDefinitionError``.

How a trial runs (``run_trial``, top to bottom):

1. Plan (``_plan``): a ``_Plan`` says what the trial builds, its phases, and what each phase
   trains on.  ``_PlainPlan``: any study model, as its builder built and compiled it, in one
   phase on the raw inputs.  ``_CompletePlan``: the complete model of a
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

import enum
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

from searchlab import backend, cache
from searchlab.data import Data, DataInfo, info_of
from searchlab.errors import StudyDefinitionError, TrialFailed, TrialPruned
from searchlab.models.transfer import MATMUL_CONVS
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


def _seed(spec: TrialSpec, number: int, phase: int = 0) -> None:
    """Seed Python's, NumPy's and the backend's random streams for ``phase`` of trial
    ``number``: the one place a trial seeds them (the module doc says when)."""
    keras.utils.set_random_seed(trial_seed(spec.seed, number) + phase)


class _Monitor(keras.callbacks.Callback):
    """Per-epoch report, NaN guard and in-memory best-weights checkpoint."""

    def __init__(self, spec: TrialSpec, on_epoch: EpochCallback | None) -> None:
        super().__init__()
        self.spec = spec
        self.on_epoch = on_epoch
        self.target: Any = None  # whose weights to keep: the plan's model, also when a part fits
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
                self.best, self.best_epoch, improved = value, epoch + 1, True  # from 1
        if self.on_epoch is not None:  # logs the epoch; a pruner raises TrialPruned here
            self.on_epoch(epoch, logs)
        if improved:  # copied once the pruner let the trial go on: a pruned trial keeps none
            target = self.model if self.target is None else self.target
            self.best_weights = target.get_weights()


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
    """The part of a trial that runs under its precision policy; fills ``result`` in."""
    plan = _plan(number, params, spec)
    result.tags.update(plan.tags)
    result.tags.update(_device_tags(plan.model))
    warning = backend.output_dtype_warning(plan.model, spec.precision)
    if warning:
        log.warning("trial %s: %s", number, warning)
    monitor.target = plan.model
    fit_started = time.perf_counter()
    try:
        _fit_phases(plan, number, params, spec, monitor, result.tags)
    except TrialPruned:
        plan.finish()
        raise
    else:  # ended, also on a NaN loss: the next trial resets every variable
        plan.finish()
    finally:
        result.fit_seconds = time.perf_counter() - fit_started
    result.history = monitor.history
    if monitor.bad_loss:
        raise TrialFailed(f"NaN/inf loss: {monitor.bad_loss}")
    if monitor.best_weights is None:
        raise TrialFailed(f"the objective {spec.objective!r} was never finite")
    plan.model.set_weights(monitor.best_weights)
    workdir.mkdir(parents=True, exist_ok=True)
    result.weights_path, tags = plan.save(workdir)
    result.tags.update(tags)
    result.state = TrialState.COMPLETE
    result.value, result.best_epoch = monitor.best, monitor.best_epoch


def _plan(number: int, params: Mapping[str, Any], spec: TrialSpec) -> _Plan:
    """How the trial trains; seeds, then builds the model it trains (module doc, 1-2)."""
    build, info = spec.build, info_of(spec.data)
    transfer = build if isinstance(build, cache.TransferBuilder) else None
    on_features = None
    if transfer is not None:  # this may build the template, drawing random numbers
        on_features = cache.plan_trial(
            transfer, params, info, spec.epochs, spec.data, cache.default_cache()
        )
    _seed(spec, number)  # so after planning: the same streams for a model with and without one
    if transfer is not None and on_features is not None:
        return _SuffixPlan(transfer, params, info, on_features)
    model = build_model(build, params, info)
    if transfer is None:
        return _PlainPlan(model, spec.epochs)
    return _CompletePlan(transfer, params, model, spec.epochs)


def _fit_phases(
    plan: _Plan,
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: _Monitor,
    tags: dict[str, str],
) -> None:
    """Fit the plan's phases one after the other, each for its epochs (the epoch count goes on
    across phases); ``tags`` say where each phase's inputs came from before it trains, so a
    pruned or failed phase says so too."""
    data = spec.data
    batch_size = int(params.get("batch_size", spec.batch_size))
    sources: list[str] = []
    epoch = 0
    for phase, (epochs, _, _) in enumerate(plan.phases):
        step = plan.start(phase, data)
        if step.source is not None:  # a transfer phase: say where its inputs come from
            sources.append(step.source)
            _tag_phase(tags, phase, step, sources)
        ready = plan.ready(phase, step)
        if ready is not _Ready.AS_BUILT:
            # Reseed right before fit: the same trial shuffles and drops out identically with
            # and without the cache (computing features must not move the random streams).
            _seed(spec, number, phase)
        if ready is not _Ready.RESTARTED:
            backend.build_for_fit(step.model, step.x, data.y_train, batch_size)  # one trace
            plan.built(phase)
        # on features the steps are small: fit's input pipeline would cost more than they do
        fit = _keras_fit if step.cut is None else backend.fit_arrays
        fit(
            step.model,
            step.x,
            data.y_train,
            (step.x_val, data.y_val),
            batch_size=batch_size,
            initial_epoch=epoch,
            epochs=epoch + epochs,
            callbacks=[monitor],
        )
        epoch += epochs
        if monitor.bad_loss:
            break


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
    """``model.fit`` with ``backend.fit_arrays``'s signature."""
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


class _CompletePlan(_Plan):
    """A transfer builder's complete model.  Each phase freezes it and trains it on the raw
    inputs, or, with the feature cache on, its part after the deepest frozen prefix
    (``cache.suffix_model``: the same layers) on the prefix's features, when they fit."""

    def __init__(
        self, build: cache.TransferBuilder, params: Mapping[str, Any], model: Any, epochs: int
    ) -> None:
        self.build, self.params, self.model = build, params, model
        self.store = cache.default_cache()
        self.valid = cache.cut_points(model)  # before any part of it adds nodes to its layers
        self.phases = build.schedule(params, model, epochs)
        self.tags = {}

    def start(self, phase: int, data: Data) -> _Step:
        self.build.freeze(self.model, self.phases[phase][1])
        cut = cache.plan_cut(self.model, self.valid) if self.build.feature_cache else None
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
    model = build_model(build, params, info)
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
