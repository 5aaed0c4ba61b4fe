"""Fit a plan's phases one after the other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from searchlab import backend
from searchlab.data import Data, batches
from searchlab.training.checkpointer import saved_variables
from searchlab.training.monitor import Monitor
from searchlab.training.plans import Plan, Ready, Step
from searchlab.training.seeds import Seeds
from searchlab.training.spec import TrialSpec, batch_size_of
from searchlab.training.userfit import user_fit


def fit_phases(
    plan: Plan,
    number: int,
    params: Mapping[str, Any],
    spec: TrialSpec,
    monitor: Monitor,
    tags: dict[str, str],
    execution: int = 0,
) -> None:
    """Fit the plan's phases one after the other, each for its epochs (the epoch count goes on
    across phases); ``tags`` say where each phase's inputs came from before it trains, so a
    pruned or failed phase says so too."""
    data = spec.data
    batch_size = batch_size_of(params, spec)
    if plan.own_fit:
        user_fit(plan.model, params, spec, monitor, batch_size)
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
            tag_phase(tags, phase, step, sources)
            tags.update(plan.tags)  # what starting the phase found (a twin reused)
        ready = plan.ready(phase, step)
        if ready not in (Ready.AS_BUILT, Ready.TAKEN):
            # Reseed right before fit: the same trial shuffles and drops out identically with
            # and without the cache (computing features must not move the random streams).
            Seeds(spec, number, execution).before_phase(phase)
        if ready not in (Ready.RESTARTED, Ready.TAKEN):
            backend.build_for_fit(step.model, step.x, data.y_train, batch_size)  # one trace
            plan.built(phase)
        start = epoch
        if saver is not None:
            saver.track(phase, saved_variables(plan, step), step.model)
            if resume is not None and phase < resume.phase:  # trained before the checkpoint
                epoch += epochs
                continue
            if resume is not None:  # the checkpoint's phase: on from its epoch
                saver.restore(resume, monitor)
                start, resume = resume.epoch, None
        if start < epoch + epochs:
            _fit_for(step, data)(
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


def _fit_for(step: Step, data: Data) -> Callable[..., None]:
    """How ``step`` fits: on features the steps are small (fit's input pipeline would cost
    more than they do), a folder's inputs train on its own batches (the same in memory or
    not), any other raw inputs through ``model.fit``."""
    if step.cut is not None:
        return backend.fit_arrays
    return batches_fit if data.own_batches else keras_fit


def keras_fit(
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
    train through ``batches_fit``: ``Data.own_batches``)."""
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


def batches_fit(
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


def tag_phase(tags: dict[str, str], phase: int, step: Step, sources: list[str]) -> None:
    """The trial's cache tags once ``phase`` starts (``sources``: each phase's so far)."""
    if step.note:
        tags[f"searchlab.cache_note.{phase}"] = step.note
    if step.cut is not None:
        tags["searchlab.cache_layer"] = step.cut.name
        tags["searchlab.cache_layer_index"] = str(step.cut.index)
    tags["searchlab.cache"] = "used" if any(s != "off" for s in sources) else "off"
    tags["searchlab.cache_phases"] = ",".join(sources)
    tags["searchlab.phases"] = str(len(sources))
