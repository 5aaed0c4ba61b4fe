"""Frozen-prefix feature cache: compute the frozen part of a model once, train the rest on it.

When the first layers of a model are frozen and nothing random acts on them (no augmentation
or dropout before the cut; a frozen BatchNorm runs in inference mode in Keras 3), their output
is the same in every epoch and in every trial that freezes the same prefix.  ``plan_cut`` finds
the deepest layer where the model can be cut (one tensor crosses the cut, everything before it
is frozen and deterministic), ``FeatureCache.features`` computes that layer's outputs for the
training and validation images once, and ``suffix_model`` is the rest of the model -- sharing
its layers, so training it trains the complete model.

Features are keyed by (model name, the prefix layers' configs -- which cover the input size,
resizing and preprocessing --, a hash of the prefix's weights, the cut layer, the data's
fingerprint).  They are kept in memory (LRU, bounded) and on disk under the project folder
(``.searchlab/feature-cache/``, bounded, oldest files evicted first) so a resumed or parallel
study reuses them; workers of one machine that need the same features at once compute them
once (``FeatureCache.computing``: the others wait on a file lock, then read the disk).
Bounds: ``$SEARCHLAB_CACHE_MEMORY_MB`` (default 2048) and ``$SEARCHLAB_CACHE_DISK_MB``
(default 4096; 0 turns the disk cache off).

Which models: a builder that satisfies ``TransferBuilder`` (below; ``searchlab.models.Transfer``
does) says how it trains in phases, how to freeze, and how to build the part after a cut; this
module asks nothing else of it and imports no builder.  Any other compiled model (a user's
``build_model(hp)``, HyperModel or builder) goes through ``auto_cut`` (at the end): its graph
(``graph_of``: a ``Sequential``'s layers are called again on a new input, sharing them; a
nested backbone model is one layer, cut after, unless it is partly frozen and a chain of
layers: then its layers are called in its place, and the cut may fall inside it) is cut by ``plan_cut`` as a
transfer model is, provided the prefix holds a frozen layer with weights, its features fit
the memory bound, the model's compile arguments can be copied onto the part after the cut
(``compile_like``), and the prefix's weights are the same as in the earlier trials of this
process with the same layer configs (a second fingerprint for one configs digest means the
backbone is initialised per trial: ``Reason.RANDOM_WEIGHTS``, remembered per
``backbone_seed``).  Otherwise ``auto_cut`` returns a ``NoCut`` whose ``Reason`` the trial
tags (``searchlab.cache.reason``) and the runner logs once per session.  Such features are
keyed as a transfer model's, plus a digest of the graph's non-layer operations (the
``keras.ops`` calls of a functional model: their class and config, not their constant
arguments) and without the model's name.

A trial whose every phase can train on features does not build its complete model:
``plan_trial`` plans the cuts on a ``Template`` (the builder's complete model, built once per
process and never trained; it also computes the features and fingerprints the prefix) and
returns a ``FeaturePlan``; the builder builds only the suffix from the shallowest cut, and
``save_suffix`` writes that suffix's weights with the cut and the prefix's fingerprint.
``load_suffix`` puts them into the complete model rebuilt by the builder (for the best model,
export, reeval) after checking that its prefix has the same fingerprint.  When ``plan_trial``
returns None the trial builds the complete model and cuts it per phase (``plan_cut``,
``suffix_model``), or trains it on raw inputs where it has no cut.

Such a trial trains a compiled suffix that an earlier trial of the same structure left in a
small per-process pool, when there is one (``training_suffix`` takes it, ``keep_suffix`` gives
it back): the backend then does not trace its train and test steps again, which is most of
what a small head costs beyond its training steps.  Before it trains, every variable is put
back where a new suffix starts (the builder's ``reset_suffix``; the optimizer's variables as
they were before its first step, the trial's learning rate; the metrics), so a trial ends
where it would have ended on a new suffix, whatever the last one did (pruned, NaN loss).
A hand-written model's part after an ``auto_cut`` trains through a ``Twin`` instead: a
compiled copy made from the part's layer configs (``Dropout`` as ``RateDropout``, its rate in
variables) with a new optimizer of the model's config, pooled by ``twin_key`` (the structure
without layer names, dropout rates or a constant learning rate).  Each trial puts its own
part's variables into the twin (``Twin.take``: weights, dropout seed states and rates, the
learning rate; the optimizer and metrics as new), trains the twin, and puts the trained
weights back into its part (``Twin.give``) before saving the complete model.

Modules: ``graph`` (where a model can be cut), ``fingerprint`` (what identifies a prefix's
features), ``features`` (the store), ``builder`` (the ``TransferBuilder`` protocol, templates,
``plan_trial``), ``suffix`` (the suffix pool and weights file), ``auto`` (``auto_cut``), ``twin``
(a hand-written model's twin) and ``pools`` (``POOLS``: every process-wide pool, ``reset()``).
"""

from searchlab.training.cache.auto import AutoCut, auto_cut, compile_like
from searchlab.training.cache.builder import (
    FeaturePlan,
    Template,
    TransferBuilder,
    plan_trial,
    template,
)
from searchlab.training.cache.features import (
    CACHE_DIR,
    COMPUTING_LOCK,
    DISK_ENV,
    MEMORY_ENV,
    FeatureCache,
    Features,
    Source,
    default_cache,
    feature_batch,
)
from searchlab.training.cache.fingerprint import prefix_fingerprint, weights_hash
from searchlab.training.cache.graph import (
    Cut,
    NoCut,
    Reason,
    cache_safe,
    cut_points,
    graph_of,
    is_random,
    plan_cut,
    suffix_model,
    why_no_cut,
)
from searchlab.training.cache.pools import POOLS, Pools
from searchlab.training.cache.suffix import (
    STEPS_PER_EXECUTION,
    SUFFIX_FORMAT,
    SUFFIX_POOL_MB,
    SUFFIX_POOL_SIZE,
    Suffix,
    keep_suffix,
    load_suffix,
    run_steps_together,
    save_suffix,
    training_suffix,
)
from searchlab.training.cache.twin import RateDropout, Twin, keep_twin, twin_for, twin_key

__all__ = [
    "AUTO_GRAPH_INPUT",
    "AutoCut",
    "CACHE_DIR",
    "COMPUTING_LOCK",
    "Cut",
    "DISK_ENV",
    "FeatureCache",
    "FeaturePlan",
    "Features",
    "MEMORY_ENV",
    "NoCut",
    "POOLS",
    "Pools",
    "RateDropout",
    "Reason",
    "STEPS_PER_EXECUTION",
    "SUFFIX_FORMAT",
    "SUFFIX_POOL_MB",
    "SUFFIX_POOL_SIZE",
    "Source",
    "Suffix",
    "Template",
    "TransferBuilder",
    "Twin",
    "auto_cut",
    "cache_safe",
    "compile_like",
    "cut_points",
    "default_cache",
    "feature_batch",
    "graph_of",
    "is_random",
    "keep_suffix",
    "keep_twin",
    "load_suffix",
    "plan_cut",
    "plan_trial",
    "prefix_fingerprint",
    "run_steps_together",
    "save_suffix",
    "suffix_model",
    "template",
    "training_suffix",
    "twin_for",
    "twin_key",
    "weights_hash",
    "why_no_cut",
]
