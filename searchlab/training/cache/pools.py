"""Every process-wide pool and memo of the feature cache, in one object (``POOLS``).

They survive between the trials of a process, which is what makes a study's later trials
cheap: the feature store's memory, the template of a transfer builder, compiled suffixes and
twins that later trials train again, the prefixes seen so far (to tell a backbone initialised
per trial), and the last prefix weights hashed.  ``POOLS.reset()`` empties them all (tests, a
notebook that wants a cold start); nothing else holds state between trials.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from searchlab.training.cache.builder import Template
    from searchlab.training.cache.features import FeatureCache
    from searchlab.training.cache.suffix import Suffix
    from searchlab.training.cache.twin import Twin


@dataclass
class Pools:
    """The process-wide state of the feature cache (module doc)."""

    #: the process-wide feature store (``default_cache``), made at its first use
    features: FeatureCache | None = None
    #: the template of the last builder/data shape/dtype policy asked for (one is kept: a
    #: template holds a complete backbone)
    templates: dict[tuple, Template] = field(default_factory=dict)
    #: compiled suffixes that trials gave back, by structure, least recently used first; at
    #: most ``SUFFIX_POOL_SIZE`` of them and ``SUFFIX_POOL_MB`` of their variables (the newest
    #: is kept whatever its size)
    suffixes: OrderedDict[tuple, Suffix] = field(default_factory=OrderedDict)
    #: compiled twins of hand-written models' parts after a cut, by structure (``twin_key``),
    #: least recently used first; at most ``SUFFIX_POOL_SIZE`` of them
    twins: OrderedDict[str, Twin] = field(default_factory=OrderedDict)
    #: the configs digest of each prefix cut so far -> its weights fingerprint; a second
    #: fingerprint for the same configs means the prefix is initialised per trial
    seen_prefixes: OrderedDict[str, str] = field(default_factory=OrderedDict)
    #: configs digests known to be initialised per trial
    random_prefixes: set[str] = field(default_factory=set)
    #: the prefix weights ``weights_hash`` hashed last, and the hash after them
    last_weights: list[tuple[list[np.ndarray], Any]] = field(default_factory=list)

    def reset(self, features: FeatureCache | None = None) -> None:
        """Empty every pool; ``features``: the feature store to use from now on (None: a
        new default one at the next use)."""
        self.features = features
        self.templates = {}
        self.suffixes = OrderedDict()
        self.twins = OrderedDict()
        self.seen_prefixes = OrderedDict()
        self.random_prefixes = set()
        self.last_weights = []


POOLS = Pools()
