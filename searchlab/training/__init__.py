"""The training core: run one trial (``run_trial``), rebuild a trained model (``load_trained``),
check a study's first model (``preflight``), and the frozen-prefix feature cache (``cache``).

The names below are what the rest of searchlab uses; the modules behind them are private.
``TrialSpec`` and the weight-file names (``spec``) import no Keras; every other name is
imported on first use (PEP 562), so ``from searchlab.training import TrialSpec`` stays light
(the engine-contract suite, ``searchlab --help``).

Modules, top to bottom (import-linter's internal layers): ``run`` (one trial: seed, plan,
build, fit, record; the OOM retry; executions), ``load``, ``fitting`` (a plan's phases),
``userfit`` (a HyperModel's own fit), ``plans`` (what a trial builds and what each phase
trains on), ``checkpointer`` (a trial's checkpoint, written each epoch), ``monitor`` (the
callback: report, NaN guard, best weights), ``diagnose`` (OOM, full disk, hints, preflight),
``build`` (calling a builder), ``seeds`` (the seeding order), ``cache/`` and ``spec``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from searchlab.training.spec import (
    SUFFIX_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WEIGHTS_FILES,
    EpochCallback,
    TrialSpec,
    batch_size_of,
    weights_file,
)

if TYPE_CHECKING:
    from searchlab.training import cache
    from searchlab.training.build import build_model, check_model
    from searchlab.training.checkpointer import Checkpointer
    from searchlab.training.diagnose import (
        disk_full,
        ensure_space,
        first_logs,
        hint,
        out_of_memory,
        preflight,
    )
    from searchlab.training.load import load_trained
    from searchlab.training.monitor import Monitor
    from searchlab.training.run import freeze_imports, run_trial
    from searchlab.training.seeds import EXECUTION_SEED_STRIDE, trial_seed

#: name -> the private module that defines it (imported on first use: they import Keras)
_LAZY = {
    "cache": "searchlab.training.cache",
    "build_model": "searchlab.training.build",
    "check_model": "searchlab.training.build",
    "Checkpointer": "searchlab.training.checkpointer",
    "disk_full": "searchlab.training.diagnose",
    "ensure_space": "searchlab.training.diagnose",
    "first_logs": "searchlab.training.diagnose",
    "hint": "searchlab.training.diagnose",
    "out_of_memory": "searchlab.training.diagnose",
    "preflight": "searchlab.training.diagnose",
    "load_trained": "searchlab.training.load",
    "Monitor": "searchlab.training.monitor",
    "freeze_imports": "searchlab.training.run",
    "run_trial": "searchlab.training.run",
    "EXECUTION_SEED_STRIDE": "searchlab.training.seeds",
    "trial_seed": "searchlab.training.seeds",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if name == "cache" else getattr(imported, name)
    globals()[name] = value
    return value


__all__ = [
    "EXECUTION_SEED_STRIDE",
    "SUFFIX_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_FILES",
    "Checkpointer",
    "EpochCallback",
    "Monitor",
    "TrialSpec",
    "batch_size_of",
    "build_model",
    "cache",
    "check_model",
    "disk_full",
    "ensure_space",
    "first_logs",
    "freeze_imports",
    "hint",
    "load_trained",
    "out_of_memory",
    "preflight",
    "run_trial",
    "trial_seed",
    "weights_file",
]
