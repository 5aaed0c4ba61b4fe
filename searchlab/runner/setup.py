"""What a session is built from, before any store is touched: the engine and the budget
checked (``prepare``), the trials' shared spec with the data loaded (``trial_spec``), and
what the parent run and every trial run record (``session_info``, ``result_settings``,
``data_inputs``, ``trial_tags``).  Nothing here takes a ``Session``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from searchlab import coordination, engines
from searchlab.data import class_names_json, head
from searchlab.errors import SearchlabError
from searchlab.outcome import TrialResult
from searchlab.store import redact

if TYPE_CHECKING:
    from searchlab.data import Data
    from searchlab.engines import Engine, RunOptions
    from searchlab.study import Study
    from searchlab.tracking import DataInput
    from searchlab.training import TrialSpec

#: how a trial is trained: ``training.run_trial``'s signature (tests hand the runner a stub)
TrainFn = Callable[..., TrialResult]


def prepare(
    study: Study, options: RunOptions, *, check: bool = True
) -> tuple[Engine, int | None, TrialSpec]:
    """The engine (its settings checked), the budget, and the trials' spec with the data
    loaded and a transfer backbone's weights file found (or downloaded): every mistake in the study or the flags is raised here, before a store is
    touched.  ``check``: also build one model and check it against the data and the
    objective (``trial.preflight``; once per session, not in each worker)."""
    engine = engines.create(study, options)
    engine.check()
    if options.session_key and options.reeval_top:
        raise SearchlabError(
            "--reeval-top re-trains after the search, in one process; a shared --session has "
            "many. Drop --reeval-top, and re-evaluate afterwards with searchlab run "
            "--reeval-top K --trials <the trials done> (without --session)."
        )
    target = engines.budget(study, options)
    spec = trial_spec(study, options)
    fetch_weights = getattr(spec.build, "fetch_weights", None)  # models.Transfer
    if fetch_weights is not None:  # missing ImageNet weights stop the run here, not in a trial
        fetch_weights(tuple(spec.data.input_shape))
    if check:
        from searchlab import training as trial_mod

        trial_mod.preflight(spec, study.search_space.defaults())
    return engine, target, spec


def session_info(
    study: Study,
    options: RunOptions,
    target: int | None,
    engine: Engine,
    data_source: str = "",
    settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What a session's parent run records (tags, ``space.*`` and ``run_params`` params:
    the precision and the other ``settings`` that change results)."""
    from searchlab import backend

    engine_info = engine.info()
    info: dict[str, Any] = {
        "strategy": options.strategy,
        "engine": engine.name,
        "objective": study.objective,
        "direction": study.goal,
        "budget": target if target is not None else "timeout",
        "epochs": options.epochs,
        "pruner": engine_info["pruner"],
        "seed": options.seed,
        "storage": redact(options.storage),
        "optuna_study": study.name,
        "precision": options.precision,
        "space": study.search_space.describe(),
        "run_params": {"precision": options.precision, **(settings or {})},
    }
    if data_source:
        info["data"] = data_source
    if settings and "class_names" in settings:  # also a tag: export and users read it there
        info["class_names"] = settings["class_names"]
    if engine_info.get("pruner_args"):  # the pruner's settings (tag searchlab.pruner_args)
        info["pruner_args"] = engine_info["pruner_args"]
    info.update(backend.session_info())  # backend, versions, devices: tags of the parent run
    return info


def result_settings(study: Study, options: RunOptions, data: Data) -> dict[str, str]:
    """The session's settings that change what a trial gives, by name: the epochs, the
    data (name, subset, a digest of the arrays), the precision and what the model builder
    reports of itself (``settings()``: a ``Transfer``'s backbone, its weights' source, the
    input size...).  Params of the parent run; a study resumed with other values mixes
    incomparable trials (see ``StudyStore.open``)."""
    subset = study.dataset.subset
    parts = {"train": subset} if isinstance(subset, int) else dict(subset or ())
    settings = {
        "epochs": str(options.epochs),
        "data": study.dataset.label,
        "subset": ",".join(f"{k}={v}" for k, v in sorted(parts.items())) or "all",
        "data_digest": data.fingerprint,
        "precision": options.precision,
    }
    if data.class_names is not None:  # an image folder: its classes, by class id
        settings["class_names"] = class_names_json(data.class_names)
    if study.backbone_seed is not None:  # every trial's initial weights come from it
        settings["backbone_seed"] = str(study.backbone_seed)
    describe = getattr(study.model, "settings", None)
    if callable(describe):
        settings.update({f"model.{k}": str(v) for k, v in describe().items()})
    return settings


def data_inputs(study: Study, data: Data) -> list[DataInput]:
    """The splits a trial trains and validates on, as MLflow dataset inputs."""
    from searchlab.tracking import DataInput

    source = data.source if not data.source.startswith("loader ") else ""
    return [
        # inputs that stream from disk: MLflow's schema and profile from their first rows
        DataInput(study.dataset.label, context, data.digest(split), head(x), y, source)
        for context, split, x, y in (
            ("train", "train", data.x_train, data.y_train),
            ("validation", "val", data.x_val, data.y_val),
        )
    ]


def trial_tags(study: Study, options: RunOptions, engine: str) -> dict[str, str]:
    """Tags on every trial run of a session (and its re-evaluation runs)."""
    return {
        "searchlab.study": study.name,
        "searchlab.strategy": options.strategy,
        "searchlab.engine": engine,
        **({"searchlab.worker": options.worker} if options.one_of_several else {}),
        # a shared session's trials say which machine ran them
        **({"searchlab.host": coordination.hostname()} if options.session_key else {}),
        **(
            {"searchlab.cuda_visible_devices": os.environ["CUDA_VISIBLE_DEVICES"]}
            if "CUDA_VISIBLE_DEVICES" in os.environ
            else {}
        ),
        **{str(k): str(v) for k, v in study.tags.items()},
    }


def trial_spec(study: Study, options: RunOptions) -> TrialSpec:
    """What every trial of the session shares: the builder, the loaded data, the settings."""
    from searchlab import data as data_mod
    from searchlab import training as trial_mod

    return trial_mod.TrialSpec(
        build=study.model,
        data=data_mod.load(study.dataset, options.data_dir),
        epochs=options.epochs,
        objective=study.objective,
        direction=study.goal,
        batch_size=study.batch_size,
        seed=options.seed,
        precision=options.precision,
        fit=study.fit,
        executions=options.executions_per_trial or study.executions_per_trial,
        max_model_size=study.max_model_size,
        cache=study.cache,
        backbone_seed=study.backbone_seed,
    )
