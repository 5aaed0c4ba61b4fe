"""A trial's checkpoint writer and reader (the file format is ``searchlab.checkpoint``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from searchlab import checkpoint
from searchlab.training.monitor import Monitor
from searchlab.training.spec import TrialSpec, batch_size_of

if TYPE_CHECKING:
    from searchlab.training.plans import Plan, Step

log = logging.getLogger("searchlab.trial")  # the name log lines and configs know


# -- checkpoints: go on from the last finished epoch ----------------------------------------


class Checkpointer:
    """A trial's checkpoint (``searchlab.checkpoint``): written after each epoch it finishes
    (``Monitor.record``: copied before the epoch is reported, written to disk in a thread
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
        #: completed by ``Monitor.keep`` at a phase's start) is written again
        self._written_best: list[np.ndarray] | None = None
        self.folder = folder
        self.state = state  # the checkpoint found at the start, if any
        self.batch_size = batch_size
        self.tags: dict[str, str] = dict(state.tags) if state is not None else {}
        self.phase = 0
        self.variables: list[Any] = []
        self.model: Any = None

    @classmethod
    def open(cls, spec: TrialSpec, params: Mapping[str, Any]) -> Checkpointer | None:
        """The trial's checkpointer; None when it keeps none (no folder, a HyperModel's
        own fit, several executions).  Raises ``CheckpointError`` for an unreadable one."""
        if spec.checkpoint is None or spec.fit is not None or spec.executions != 1:
            return None
        state = checkpoint.load(spec.checkpoint)
        size = state.batch_size if state is not None else batch_size_of(params, spec)
        saver = cls(spec.checkpoint, state, size)
        if state is not None:
            log.info("trial resumed after epoch %s from %s", state.epoch, spec.checkpoint)
        return saver

    def resumed_tags(self) -> dict[str, str]:
        """The trial's tags from the checkpoint it goes on from (none for a new trial)."""
        if self.state is None:
            return {}
        return {**self.state.tags, "searchlab.resumed_epoch": str(self.state.epoch)}

    def track(self, phase: int, variables: list[Any], model: Any) -> None:
        """``phase`` starts: its checkpoints hold ``variables`` and ``model``'s optimizer."""
        self.phase, self.variables, self.model = phase, variables, model
        optimizer = model.optimizer
        if not optimizer.built:  # fit would build it on its first step; the restore needs it
            optimizer.build(model.trainable_variables)

    def save(self, monitor: Monitor, epoch: int, improved: bool) -> None:
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

    def restore(self, state: checkpoint.State, monitor: Monitor) -> None:
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


def saved_variables(plan: Plan, step: Step) -> list[Any]:
    """What a checkpoint of ``step`` holds: the part trained on cached features (a frozen
    prefix is the same on every start), else the plan's whole model (with the seed states of
    its dropout layers: ``variables``)."""
    if step.cut is not None:
        return list(step.model.variables)
    return list(plan.model.variables)
