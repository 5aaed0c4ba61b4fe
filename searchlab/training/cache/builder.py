"""What the cache asks of a transfer builder (``TransferBuilder``), and the plan of a trial
that trains every phase on cached features, cut on a process-wide ``Template``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import keras

from searchlab.data import Data
from searchlab.training.cache.features import FeatureCache
from searchlab.training.cache.fingerprint import prefix_fingerprint, prefix_key
from searchlab.training.cache.graph import Cut, cut_points, plan_cut
from searchlab.training.cache.pools import POOLS


@runtime_checkable
class TransferBuilder(Protocol):
    """A model builder that trains in phases over a frozen prefix: all that a trial and this
    cache ask of one (``searchlab.models.Transfer`` is the one we ship; ``isinstance`` tells).

    Like any study model builder, ``build(params, info)`` returns the complete model, compiled.
    A builder without the rest trains that model as built, in one phase, without the cache.

    Call order in one trial (``searchlab.training``), ``frozen`` counting backbone layers:

    1. Only if ``feature_cache``: ``template_key(info)`` names the process's template; a new
       key builds it once with ``build_uncompiled({}, info)`` (never trained).  On it,
       ``schedule(params, template, epochs)`` gives the phases, and per phase
       ``freeze(template, frozen)`` exposes that phase's cut (``plan_trial``).
    2. The trial seeds the random streams, then builds.  When every phase has a cut whose
       features fit in memory, only the suffix after the shallowest cut: a pooled suffix of
       equal ``suffix_key(params, info, template, cut)`` (None: never pooled) is put back by
       ``reset_suffix(suffix, params, template)``, else ``build_suffix(params, info,
       template, cut)`` builds one -- the two must draw the same from ``random``.  Otherwise
       the complete model, ``build(params, info)``, whose phases ``schedule(params, model,
       epochs)`` gives.
    3. Per phase, in order: ``freeze(model, frozen)``; the model that trains in it (the one
       built, or its part after the phase's cut) is compiled by ``compile(part, params,
       lr_factor)`` -- on a reused suffix its optimizer restarts at ``learning_rate(params,
       lr_factor)`` instead; the trial seeds again and fits it for the phase's epochs.

    ``group_by`` names the param that moves the cut: grid search runs the points that share
    its value one after the other, so their features are computed once.
    """

    feature_cache: bool
    group_by: str

    def __call__(self, params: Mapping[str, Any], info: Any) -> keras.Model:
        """The complete model for ``params``, compiled, frozen for its first phase."""
        ...

    def schedule(
        self, params: Mapping[str, Any], model: keras.Model, study_epochs: int
    ) -> list[tuple[int, int, float]]:
        """The trial's phases as (epochs, frozen, learning-rate factor)."""
        ...

    def freeze(self, model: keras.Model, frozen: int) -> None:
        """Freeze the first ``frozen`` backbone layers of ``model`` (a complete model, the
        template or a suffix) and let the rest train."""
        ...

    def compile(
        self, model: keras.Model, params: Mapping[str, Any], lr_factor: float = 1.0
    ) -> None:
        """Compile ``model`` at ``learning_rate(params, lr_factor)``."""
        ...

    def learning_rate(self, params: Mapping[str, Any], lr_factor: float = 1.0) -> float: ...

    def template_key(self, info: Any) -> Hashable:
        """Equal keys: the same layers before the head (one template serves both)."""
        ...

    def build_uncompiled(self, params: Mapping[str, Any], info: Any) -> tuple[keras.Model, int]:
        """The complete model, not compiled, and its backbone's layer count."""
        ...

    def build_suffix(
        self, params: Mapping[str, Any], info: Any, template: keras.Model, cut: Cut
    ) -> keras.Model:
        """The layers after ``cut`` of the complete model, taking the cut's features: the same
        layer names, and the same start, as in ``build(params, info)``."""
        ...

    def suffix_key(
        self, params: Mapping[str, Any], info: Any, template: keras.Model, cut: Cut
    ) -> Hashable | None:
        """Equal keys: ``reset_suffix`` turns one ``build_suffix`` model into the other."""
        ...

    def reset_suffix(
        self, model: keras.Model, params: Mapping[str, Any], template: keras.Model
    ) -> None:
        """Put a trained ``build_suffix`` model where a new one for ``params`` starts."""
        ...


# -- trials without their complete model ---------------------------------------------------


@dataclass
class Template:
    """A builder's complete model, built once per process and never trained.

    It stands in for the complete model wherever a cached trial needs the frozen prefix:
    planning the cut of each phase, computing (once) and keying the features, and the prefix
    fingerprint that a suffix-weights file refers to.  Its weights never change, so the
    fingerprints and keys computed from it are kept.
    """

    model: keras.Model
    valid: dict[int, Any]
    fingerprints: dict[int, str] = field(default_factory=dict)
    keys: dict[tuple[int, str], str] = field(default_factory=dict)

    def cut(self, freeze: Callable[[keras.Model, int], None], frozen: int) -> Cut | None:
        freeze(self.model, frozen)
        return plan_cut(self.model, self.valid)

    def fingerprint(self, cut: Cut) -> str:
        if cut.index not in self.fingerprints:
            self.fingerprints[cut.index] = prefix_fingerprint(self.model, cut)
        return self.fingerprints[cut.index]

    def key(self, cut: Cut, data: Data) -> str:
        memo = (cut.index, data.fingerprint)
        if memo not in self.keys:
            self.keys[memo] = prefix_key(self.model, cut, data, self.fingerprint(cut))
        return self.keys[memo]


def template(build: TransferBuilder, info: Any) -> Template:
    """The process-wide template of ``build`` (a ``Transfer``) for data of ``info``'s shape.

    It survives ``keras.backend.clear_session()`` between trials (the trials' own models do
    not), so memory stays flat: one complete model per process, whatever the trial count."""
    key = (build.template_key(info), keras.config.dtype_policy().name, keras.backend.backend())
    found = POOLS.templates.get(key)
    if found is None:
        POOLS.templates.clear()
        POOLS.suffixes.clear()  # they were cut from the old template
        model, _ = build.build_uncompiled({}, info)
        found = POOLS.templates[key] = Template(model, cut_points(model))
    return found


@dataclass(frozen=True)
class FeaturePlan:
    """A trial whose every phase trains on cached features: per phase its cut (on the
    template); the trial's model is the builder's suffix from the shallowest cut, ``base``."""

    template: Template
    phases: list[tuple[int, int, float]]
    cuts: list[Cut]

    @property
    def base(self) -> Cut:
        return min(self.cuts, key=lambda c: c.index)

    def train_model(self, model: keras.Model, cut: Cut) -> keras.Model:
        """The part of ``model`` (the suffix from ``base``) that trains on ``cut``'s features."""
        if cut.index == self.base.index:
            return model
        return keras.Model(
            model.get_layer(cut.name).output, model.outputs, name=f"{model.name}_suffix"
        )


def plan_trial(
    build: TransferBuilder,
    params: Mapping[str, Any],
    info: Any,
    epochs: int,
    data: Data,
    store: FeatureCache,
) -> FeaturePlan | None:
    """The plan of a trial of ``build`` when its feature cache is on and every phase can train
    on cached features that fit in memory; None when one cannot (that trial builds its
    complete model)."""
    if not build.feature_cache:
        return None
    tpl = template(build, info)
    phases = build.schedule(params, tpl.model, epochs)
    cuts = []
    for _, frozen, _ in phases:
        cut = tpl.cut(build.freeze, frozen)
        if cut is None or not store.fits(cut, data):
            return None
        cuts.append(cut)
    return FeaturePlan(tpl, phases, cuts) if cuts else None
