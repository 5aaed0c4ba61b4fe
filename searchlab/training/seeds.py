"""How a trial seeds Python's, NumPy's and the backend's random streams: ``Seeds``, whose
methods the trial calls in this order, and the only code that seeds them."""

from __future__ import annotations

from dataclasses import dataclass

import keras

from searchlab.training.spec import TrialSpec


def trial_seed(seed: int, number: int) -> int:
    return (seed * 100_003 + number) % (2**31 - 1)


#: seed offset between the executions of a trial (``executions_per_trial``)
EXECUTION_SEED_STRIDE = 7_919


def seed_streams(spec: TrialSpec, number: int, phase: int = 0, execution: int = 0) -> None:
    """Seed the streams for ``phase`` of trial ``number`` (and its ``execution``)."""
    offset = phase + EXECUTION_SEED_STRIDE * execution
    keras.utils.set_random_seed(trial_seed(spec.seed, number) + offset)


@dataclass(frozen=True)
class Seeds:
    """The seeds of one execution of trial ``number``, called in this order, so that the same
    trial initialises, shuffles and drops out identically with and without the feature cache:

    1. ``before_build``: after planning (a transfer plan may build its template, which draws
       random numbers), before the model is built: the study's ``backbone_seed`` when it sets
       one for its own model (``fixed``: every trial builds the same frozen part), else the
       trial's seed;
    2. ``after_build``: with a ``backbone_seed``, the trial's own seed for its fit;
    3. ``before_phase``: right before each phase that the trial compiled starts training, the
       trial's seed plus the phase's index (computing features must not move the streams).
       A model its builder compiled trains on from where its build left the streams.
    """

    spec: TrialSpec
    number: int
    execution: int = 0
    fixed: bool = False

    def before_build(self) -> None:
        if self.fixed:
            keras.utils.set_random_seed(int(self.spec.backbone_seed))  # type: ignore[arg-type]
        else:
            seed_streams(self.spec, self.number, execution=self.execution)

    def after_build(self) -> None:
        if self.fixed:
            seed_streams(self.spec, self.number, execution=self.execution)

    def before_phase(self, phase: int) -> None:
        seed_streams(self.spec, self.number, phase, self.execution)
