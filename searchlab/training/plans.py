"""Plans: what a trial builds, and what each phase trains on."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from searchlab.data import Data, DataInfo
from searchlab.models.transfer import MATMUL_CONVS
from searchlab.outcome import CACHE_REASON_TAG
from searchlab.training import cache
from searchlab.training.diagnose import ensure_space
from searchlab.training.spec import SUFFIX_WEIGHTS_FILE, WEIGHTS_FILE, TrialSpec

log = logging.getLogger("searchlab.trial")  # the name log lines and configs know


# -- plans: what a trial builds, and what each phase trains on -----------------------------


@dataclass
class Step:
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


class Ready(enum.Enum):
    """How a phase's model was readied for fit, which decides what the trial does next."""

    AS_BUILT = "as built"  # compiled by the study's builder: no seed, build for fit
    COMPILED = "compiled"  # compiled for this phase: seed, build for fit
    RESTARTED = "restarted"  # a reused suffix's phase model, restarted: seed; built already
    #: a pooled twin of the model's part, given the part's variables: no seed, built already
    TAKEN = "taken"


class Plan(Protocol):
    """How a trial trains: ``model`` (built by ``run``; its weights are the trial's),
    ``phases`` as (epochs, frozen, learning-rate factor), ``tags`` for the trial, and
    ``own_fit``: a HyperModel's own ``fit`` trains ``model`` instead of the phases.

    For each phase in order the trial calls ``start`` (what the phase trains on), then
    ``ready`` (compile it), seeds, builds the phase's model for fit unless restarted and then
    calls ``built``, and fits.  Once the fit ended (also pruned or on a NaN loss) it calls
    ``finish``; with the best weights put back into ``model``, ``save``.  The plans below
    implement it side by side (no base class): what they share are the functions
    ``save_whole`` and ``save_suffix_weights``.
    """

    model: Any
    phases: list[tuple[int, int, float]]
    tags: dict[str, str]
    own_fit: bool

    def start(self, phase: int, data: Data) -> Step: ...

    def ready(self, phase: int, step: Step) -> Ready: ...

    def built(self, phase: int) -> None:
        """The phase's model is built for fit (its optimizer too), not yet trained."""

    def finish(self) -> None:
        """The fit ended: give back what another trial may reuse."""

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        """Save ``model``'s weights in ``workdir``: the file and the tags that describe it."""


def save_whole(model: Any, workdir: Path) -> tuple[Path, dict[str, str]]:
    """Save the complete ``model``'s weights in ``workdir`` (``Plan.save``)."""
    path = workdir / WEIGHTS_FILE
    ensure_space(path, model)
    model.save_weights(path)
    return path, {"searchlab.weights_form": "full"}


def save_suffix_weights(
    suffix: Any, workdir: Path, cut: cache.Cut, fingerprint: str
) -> tuple[Path, dict[str, str]]:
    """Save only the layers after the frozen prefix up to ``cut`` (``Plan.save``)."""
    path = workdir / SUFFIX_WEIGHTS_FILE
    cache.save_suffix(suffix, path, cut, fingerprint)
    return path, {
        "searchlab.weights_form": "suffix",
        "searchlab.weights_prefix_layer": cut.name,
        "searchlab.weights_prefix_fingerprint": fingerprint,
    }


def _own_fit_cut(model: Any) -> cache.NoCut:
    """Why a HyperModel's own fit trains without the cache: its model freezes nothing (no
    warning: nothing to cache), or searchlab cannot train its part after the frozen prefix."""
    if model.trainable and not any(not layer.trainable for layer in _all_layers(model)):
        return cache.NoCut(cache.Reason.NO_FROZEN, "every layer trains")
    return cache.NoCut(
        cache.Reason.OWN_FIT, "searchlab cannot train its part after a frozen prefix"
    )


def _all_layers(model: Any) -> list[Any]:
    """``model``'s layers, those of nested models (a backbone) included."""
    found: list[Any] = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        if getattr(layer, "layers", None):
            found.extend(_all_layers(layer))
    return found


class AutoPlan:
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
        self.model, self.phases, self.tags = model, [(spec.epochs, 0, 1.0)], {}
        #: a HyperModel's own fit trains the model as built (no cut: ``Reason.OWN_FIT``)
        self.own_fit = spec.fit is not None
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
            found = _own_fit_cut(model)
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

    def start(self, phase: int, data: Data) -> Step:
        found = self.found
        if isinstance(found, cache.NoCut):
            return Step(self.model, data.x_train, data.x_val)
        feats = self.store.features(found.graph, found.cut, data, key=found.key)
        self.rebuildable = feats.source is not cache.Source.COMPUTED and not self.seeded
        self.suffix = cache.suffix_model(found.graph, found.cut)
        self.twin = cache.twin_for(self.suffix, self.model, found.compile_args)
        if self.twin is not None:
            self.tags["searchlab.suffix_reused"] = "true" if self.twin.reused else "false"
        return Step(
            self.suffix if self.twin is None else self.twin.model,
            feats.x_train,
            feats.x_val,
            found.cut,
            f"{found.cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: Step) -> Ready:
        # no reseeding: the streams are where the model's build left them
        if step.cut is None or not isinstance(self.found, cache.AutoCut):
            return Ready.AS_BUILT
        if self.twin is None:
            cache.compile_like(step.model, self.found)
            cache.run_steps_together(step.model)
            return Ready.AS_BUILT
        self.twin.take(self.suffix, self.model.optimizer)
        if self.twin.reused:
            return Ready.TAKEN
        cache.run_steps_together(step.model)
        return Ready.AS_BUILT

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
            return save_whole(self.model, workdir)  # its prefix comes back as saved
        return save_suffix_weights(self.suffix, workdir, found.cut, found.fingerprint)


class CompletePlan:
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
        self.tags: dict[str, str] = {}
        self.own_fit = False

    def start(self, phase: int, data: Data) -> Step:
        self.build.freeze(self.model, self.phases[phase][1])
        cut = cache.plan_cut(self.model, self.valid) if self.use_cache else None
        if cut is not None and not self.store.fits(cut, data):
            return Step(
                self.model, data.x_train, data.x_val, note="features larger than the memory bound"
            )
        if cut is None:
            return Step(self.model, data.x_train, data.x_val)
        feats = self.store.features(self.model, cut, data)
        return Step(
            cache.suffix_model(self.model, cut),
            feats.x_train,
            feats.x_val,
            cut,
            f"{cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: Step) -> Ready:
        self.build.compile(step.model, self.params, self.phases[phase][2])
        if step.cut is not None:
            cache.run_steps_together(step.model)
        return Ready.COMPILED

    def built(self, phase: int) -> None:
        pass  # nothing pooled: a complete model is the trial's own

    def finish(self) -> None:
        pass

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        return save_whole(self.model, workdir)


class SuffixPlan:
    """A transfer trial whose every phase trains on cached features (``cache.FeaturePlan``): its
    model is the builder's suffix from the plan's shallowest cut -- new, or a compiled one an
    earlier trial of the same structure gave back -- and only its weights are saved."""

    def __init__(
        self,
        build: cache.TransferBuilder,
        params: Mapping[str, Any],
        info: DataInfo,
        cached: cache.FeaturePlan,
    ) -> None:
        self.build, self.params, self.cached = build, params, cached
        self.store = cache.default_cache()
        self.suffix = cache.training_suffix(build, params, info, cached)
        self.model, self.phases = self.suffix.model, cached.phases
        self.tags = {"searchlab.suffix_reused": "true" if self.suffix.reused else "false"}
        self.own_fit = False
        matmul = getattr(self.model, MATMUL_CONVS, None)
        if matmul:  # trained as matrix products (MatmulConv2D): same numbers, other rounding
            self.tags["searchlab.matmul_convs"] = ",".join(matmul)

    def start(self, phase: int, data: Data) -> Step:
        self.build.freeze(self.model, self.phases[phase][1])
        cut, template = self.cached.cuts[phase], self.cached.template
        feats = self.store.features(template.model, cut, data, key=template.key(cut, data))
        return Step(
            self.suffix.phase_model(self.cached, phase),
            feats.x_train,
            feats.x_val,
            cut,
            f"{cut.name}:{feats.source.value}",
        )

    def ready(self, phase: int, step: Step) -> Ready:
        lr_factor = self.phases[phase][2]
        if self.suffix.reused:  # compiled by an earlier trial: its traced steps serve this one
            self.suffix.restart(phase, self.build.learning_rate(self.params, lr_factor))
            return Ready.RESTARTED
        self.build.compile(step.model, self.params, lr_factor)
        cache.run_steps_together(step.model)
        return Ready.COMPILED

    def built(self, phase: int) -> None:
        self.suffix.record(phase)

    def finish(self) -> None:
        cache.keep_suffix(self.suffix)

    def save(self, workdir: Path) -> tuple[Path, dict[str, str]]:
        base = self.cached.base
        fingerprint = self.cached.template.fingerprint(base)
        return save_suffix_weights(self.model, workdir, base, fingerprint)
