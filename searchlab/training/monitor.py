"""The callback every fit of a trial gets: per-epoch report, NaN guard, best weights."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from searchlab import interrupts
from searchlab.errors import StudyDefinitionError
from searchlab.training.spec import EpochCallback, TrialSpec

if TYPE_CHECKING:
    from searchlab.training.checkpointer import Checkpointer


class Monitor(keras.callbacks.Callback):
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
        #: writes the trial's checkpoint after each epoch (``Checkpointer``), if it keeps one
        self.saver: Checkpointer | None = None
        #: added to Keras's epoch index: a second ``model.fit`` in a HyperModel's own fit
        #: (train the head, unfreeze, fit again) counts on from the epochs recorded before
        #: (``on_epoch_begin``); searchlab's own phases pass ``initial_epoch`` (offset 0)
        self.offset = 0
        self._new_fit = True

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

    @property
    def epochs_recorded(self) -> int:
        """How many epochs ``record`` has kept (a checkpoint's restored history included)."""
        return max((len(v) for v in self.history.values()), default=0)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._new_fit = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_started = time.perf_counter()
        if self._new_fit:  # one step per epoch: a fit that starts again at 0 counts on
            self.offset = max(0, self.epochs_recorded - epoch)
            self._new_fit = False

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
        self.record(epoch + self.offset, logs)

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
            # the checkpoint is taken before anyone is told of the epoch (see Checkpointer)
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
