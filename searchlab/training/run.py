"""Run one trial top to bottom: plan it, build its model, fit it phase by phase, keep the
best epoch's weights, return its result.

This module knows nothing of Optuna or MLflow.  The engine hands it the params and a
callback ``on_epoch(epoch, logs)``; that callback logs the epoch and may raise
``TrialPruned``.  A NaN/inf loss, a builder exception or running out of memory raise
``TrialFailed`` (the study goes on); a study-level mistake (the objective is not a metric the
model reports, the builder does not return a compiled model) raises ``StudyDefinitionError``.

How a trial runs (``run_trial``, top to bottom):

1. Plan (``run._plan``): a ``plans.Plan`` says what the trial builds, its phases, and what
   each phase trains on. ``AutoPlan``: any study model, as its builder built and compiled it,
   in one phase -- on the raw inputs, or, feature cache on and a frozen prefix found
   (``training.cache.auto_cut``), its part after the prefix on the prefix's cached features,
   compiled as the model was and fit from where the build left the random streams, as the
   model itself would be; where it finds none, the trial's tag ``searchlab.cache.reason`` says
   why. ``CompletePlan``: the complete model of a ``training.cache.TransferBuilder``; each
   phase of its ``schedule`` freezes it and trains it on the raw inputs, or -- feature cache
   on, a frozen prefix found, its features within the memory bound -- its part after that
   prefix on the prefix's cached features. ``SuffixPlan``: a transfer trial whose every phase
   has such a prefix (``training.cache.plan_trial``) builds only the layers after the
   shallowest one (or reuses an earlier trial's compiled ones,
   ``training.cache.training_suffix``) and trains every phase on features.
2. Seed, build the plan's model.
3. Per phase, in one loop (``fitting.fit_phases``): the plan starts it (freezes, picks the
   model that trains and its inputs) and readies it (compiles, or restarts a reused suffix);
   the trial seeds again, builds that model for fit and fits it -- ``backend.fit_arrays`` on
   features, ``fit`` on raw inputs. ``monitor.Monitor`` reports each epoch, stops on a NaN/inf
   loss and copies the plan's model's weights at each better epoch.
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

The random streams are seeded by ``seeds.Seeds``, whose methods say when, in their order:
before the model is built (after planning), after it is built, and before each phase the
trial compiled.

A complete trial leaves its best weights in ``TrialResult.weights_path``: the complete
model's (``WEIGHTS_FILE``) or, for a ``SuffixPlan`` trial, only the layers after the frozen
prefix (``SUFFIX_WEIGHTS_FILE``; tag ``searchlab.weights_form``).  ``load_trained`` rebuilds
the complete model from either.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend, checkpoint, interrupts
from searchlab.data import info_of
from searchlab.errors import StudyDefinitionError, TrialFailed, TrialPruned
from searchlab.outcome import TrialResult, TrialState
from searchlab.training import cache
from searchlab.training.build import build_model, check_size
from searchlab.training.checkpointer import Checkpointer
from searchlab.training.diagnose import disk_full, hint, out_of_memory
from searchlab.training.fitting import fit_phases
from searchlab.training.monitor import Monitor
from searchlab.training.plans import AutoPlan, CompletePlan, Plan, SuffixPlan
from searchlab.training.seeds import Seeds
from searchlab.training.spec import EpochCallback, TrialSpec, batch_size_of, with_batch_size

log = logging.getLogger("searchlab.trial")  # the name log lines and configs know


def release_previous_trial() -> None:
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
    (``release_previous_trial``) walks only what the session made since: 0.4 s -> 0.02 s
    on a 2-core CPU.  What garbage the imports left is kept (a few cycles); not for a
    process that ran anything else (a notebook's, a test's): its garbage would be kept too."""
    gc.freeze()


def run_trial(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    on_epoch: EpochCallback | None = None,
) -> TrialResult:
    """Train one configuration and return its result; never raises for a failed trial.

    With ``spec.checkpoint`` the trial writes its checkpoint after each epoch and, when the
    folder already holds one, goes on from it (``Checkpointer``).  A trial that runs out of
    memory before its first epoch is trained again once with half the batch size (tag
    ``searchlab.oom_retry``); when that runs out of memory too, or memory runs out after an
    epoch, it fails with tag ``searchlab.oom`` (not ``early``: not a mistake of the study).

    Raises only ``StudyDefinitionError`` (the study itself is wrong), ``KeyboardInterrupt``
    and an ``OSError`` that says the disk is full (``disk_full``: every trial would fail).
    """
    started = time.perf_counter()
    asked = dict(params)
    tags = {**backend.run_tags(), "searchlab.precision": spec.precision}
    release_previous_trial()  # also resets Keras's dtype policy
    interrupts.check()  # the collection above runs callbacks that may drop a Ctrl-C
    saver: Checkpointer | None = None
    result = TrialResult(number=number, params=asked, state=TrialState.FAILED)
    try:
        saver = Checkpointer.open(spec, params)
        if saver is not None:
            tags.update(saver.resumed_tags())
            if saver.batch_size != batch_size_of(params, spec):
                params, spec = with_batch_size(params, spec, saver.batch_size)  # a retry's
        result = _attempts(number, params, spec, workdir, on_epoch, saver)
    except checkpoint.CheckpointError as exc:  # the checkpoint found could not be read
        result = _not_resumed(result, exc)
    finally:
        if saver is not None:  # the last checkpoint is whole before anyone looks for it
            saver.wait(quiet=True)
    duration = time.perf_counter() - started
    return dataclasses.replace(
        result, params=asked, tags={**tags, **result.tags}, duration=duration
    )


def _attempts(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    on_epoch: EpochCallback | None,
    saver: Checkpointer | None,
) -> TrialResult:
    """The trial's attempts: one, or a second at half the batch size when the first ran out
    of memory before its first epoch; the last one's result with every attempt's tags."""
    tags: dict[str, str] = {}
    for attempt in (1, 2):
        monitor = Monitor(spec, on_epoch, strict=spec.fit is None)
        monitor.saver = saver
        result, oom = _attempt(number, params, spec, workdir, monitor)
        tags.update(result.tags)
        size = batch_size_of(params, spec)
        if oom is None:
            break
        tags.pop("searchlab.hint", None)
        if attempt == 1 and not monitor.history and size >= 2:
            log.warning(
                "trial %s: out of memory at batch size %s; trying %s", number, size, size // 2
            )
            tags["searchlab.oom_retry"] = f"{size}->{size // 2}"
            params, spec = with_batch_size(params, spec, size // 2)
            if saver is not None:
                saver.batch_size = size // 2
                saver.tags["searchlab.oom_retry"] = tags["searchlab.oom_retry"]
            release_previous_trial()
            continue
        result = _out_of_memory(result, oom, size)
        tags["searchlab.oom"] = "true"
        break
    return dataclasses.replace(result, tags=tags)


def _out_of_memory(result: TrialResult, oom: BaseException, size: int) -> TrialResult:
    """An attempt that ran out of memory, as the trial's failure: the configuration's, not
    the study's (not ``early``, no hint)."""
    first = (str(oom).strip().splitlines() or [""])[0][:300]
    error = (
        f"out of memory at batch size {size} ({type(oom).__name__}: {first}); "
        "the sampler is told (constraint out_of_memory)"
    )
    return dataclasses.replace(result, early=False, hint=None, error=error)


def _not_resumed(result: TrialResult, exc: checkpoint.CheckpointError) -> TrialResult:
    tags = {**result.tags, "searchlab.resume_error": str(exc)[:500]}
    error = f"cannot resume from its checkpoint: {exc}"
    return dataclasses.replace(result, state=TrialState.FAILED, error=error, tags=tags)


def _attempt(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    monitor: Monitor,
) -> tuple[TrialResult, BaseException | None]:
    """Build and fit once: the attempt's result, and the exception when memory ran out
    (``run_trial`` decides what then).  ``tags`` collects what the plan and each phase say
    as they start, so a pruned or failed attempt says it too."""
    tags: dict[str, str] = {}
    fit_seconds = [0.0]
    ended = functools.partial(
        TrialResult, number, dict(params), tags=tags, fit_seconds=0.0, history={}
    )
    try:
        with backend.precision_policy(spec.precision):  # the global policy comes back after
            weights, saved = _build_and_fit(
                number, params, spec, workdir, monitor, tags, fit_seconds
            )
    except TrialPruned as exc:
        tags["searchlab.pruned_epoch"] = str(exc.epoch)
        pruned = ended(TrialState.PRUNED, monitor.best, monitor.best_epoch, error=str(exc))
        return _with_fit(pruned, monitor, fit_seconds), None
    except TrialFailed as exc:
        return _with_fit(ended(TrialState.FAILED, error=str(exc)), monitor, fit_seconds), None
    except checkpoint.CheckpointError as exc:  # a checkpoint that does not fit the model
        failed = _with_fit(ended(TrialState.FAILED), monitor, fit_seconds)
        return _not_resumed(failed, exc), None
    except (StudyDefinitionError, KeyboardInterrupt):
        raise
    except OSError as exc:
        interrupts.check()  # an interrupt that a C extension's call turned into this error
        if disk_full(exc):  # every later trial would fail alike: the study stops here
            raise
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        return _with_fit(ended(TrialState.FAILED, error=error), monitor, fit_seconds), None
    except Exception as exc:  # builder errors, OOM, backend errors: this trial only
        # a KeyboardInterrupt raised inside a C extension's call (TensorFlow's) comes out as
        # a SystemError ("returned a result with an exception set"): the interrupt wins
        interrupts.check()
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        early = not monitor.history
        found = hint(exc, monitor.target, spec.data) if early else None
        if found:
            tags["searchlab.hint"] = found
        failed = ended(TrialState.FAILED, error=error, early=early, hint=found)
        return _with_fit(failed, monitor, fit_seconds), exc if out_of_memory(exc) else None
    tags.update(saved)
    complete = ended(TrialState.COMPLETE, monitor.best, monitor.best_epoch, weights_path=weights)
    return _with_fit(complete, monitor, fit_seconds), None


def _with_fit(result: TrialResult, monitor: Monitor, fit_seconds: list[float]) -> TrialResult:
    return dataclasses.replace(result, history=monitor.history, fit_seconds=fit_seconds[0])


def _build_and_fit(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    workdir: Path,
    monitor: Monitor,
    tags: dict[str, str],
    fit_seconds: list[float],
) -> tuple[Path, dict[str, str]]:
    """The part of a trial that runs under its precision policy: fit, then save the best
    weights; return the file and the tags that describe it (``fit_seconds[0]``: the fit's
    time, also when it raised)."""
    fit_started = time.perf_counter()
    try:
        if spec.executions == 1:
            plan = _execute(number, params, spec, monitor, tags, 0)
        else:
            plan = _executions(number, params, spec, monitor, tags)
    finally:
        fit_seconds[0] = time.perf_counter() - fit_started
    monitor.put_best(plan.model)
    workdir.mkdir(parents=True, exist_ok=True)
    return plan.save(workdir)


def _execute(
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: Monitor,
    tags: dict[str, str],
    execution: int,
) -> Plan:
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
        fit_phases(plan, number, params, spec, monitor, tags, execution)
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
    monitor: Monitor,
    tags: dict[str, str],
) -> Plan:
    """KerasTuner's ``executions_per_trial``: fit ``spec.executions`` fresh models, each
    epoch logged as ``execution_N/<metric>``; then the per-epoch mean goes through
    ``monitor`` (logged, reported to the engine), and ``monitor`` ends with the mean of the
    executions' best values and the best execution's weights."""
    on_epoch = monitor.on_epoch
    runs: list[Monitor] = []
    best: tuple[Plan, Monitor] | None = None
    for execution in range(spec.executions):
        if execution:
            release_previous_trial()
        prefix = f"execution_{execution + 1}/"

        def logged(epoch: int, logs: dict[str, float], prefix: str = prefix) -> None:
            if on_epoch is not None:
                on_epoch(epoch, {prefix + k: v for k, v in logs.items()})

        run = Monitor(spec, logged, strict=monitor.strict)
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


def _plan(number: int, params: Mapping[str, Any], spec: TrialSpec, execution: int = 0) -> Plan:
    """How the trial trains; seeds, then builds the model it trains (module doc, 1-2)."""
    build, info = spec.build, info_of(spec.data)
    transfer = build if isinstance(build, cache.TransferBuilder) else None
    on_features = None
    if transfer is not None and spec.cache:  # this may build the template, drawing random numbers
        on_features = cache.plan_trial(
            transfer, params, info, spec.epochs, spec.data, cache.default_cache()
        )
    # a study's own model with a backbone_seed: every trial initialises it alike
    seeds = Seeds(
        spec, number, execution, fixed=spec.backbone_seed is not None and transfer is None
    )
    seeds.before_build()
    if transfer is not None and on_features is not None:
        return SuffixPlan(transfer, params, info, on_features)
    model = build_model(build, params, info, compiled=spec.fit is None)
    seeds.after_build()
    if spec.max_model_size is not None:
        check_size(model, info, spec.max_model_size)
    if transfer is None:
        return AutoPlan(model, spec, info)
    return CompletePlan(transfer, params, model, spec.epochs, use_cache=spec.cache)


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
