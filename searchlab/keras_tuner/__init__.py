"""KerasTuner's tuners on searchlab: change one import, ``import searchlab.keras_tuner as kt``.

``RandomSearch``, ``GridSearch``, ``BayesianOptimization`` and ``Hyperband`` take KerasTuner's
constructor arguments and methods (``search``, ``search_space_summary``, ``results_summary``,
``get_best_hyperparameters``, ``get_best_models``, ``hypermodel.build``,
``oracle.get_best_trials``); a search is a searchlab study: Optuna's samplers (and its
Hyperband pruner) propose the trials, every trial is an MLflow run, the session loop is
``searchlab run``'s (``api.run_options``).  ``directory/project_name`` holds the stores
(``optuna.db``, ``mlflow.db`` -- unless ``$MLFLOW_TRACKING_URI`` names another -- and
``mlartifacts``); the study and its MLflow experiment are named ``project_name``.
``overwrite=False`` continues the search there, ``overwrite=True`` starts over.

``HyperModel``, ``HyperParameters`` and ``Objective`` are KerasTuner's own (imported when first
used).  An argument searchlab does not support is refused in one line (``UnsupportedArgument``)
that says what to do instead.  What differs from KerasTuner: docs/kerastuner.md.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchlab.hp import DEFAULT_OBJECTIVE, FixedHP, HpSpace, Overrides, is_hypermodel, own_fit
from searchlab.keras_tuner._support import (
    UnsupportedArgument,
    _loader,
    _override_params,
    _refuse,
    _trained,
    hyperband_trials,
    recompile,
)

log = logging.getLogger(__name__)
#: KerasTuner's names this module hands on from ``keras_tuner`` itself
_FROM_KERAS_TUNER = ("HyperModel", "HyperParameters", "Objective", "applications")
#: ``search()`` arguments searchlab sets itself (the rest go to ``model.fit``)
_OWN_FIT_ARGS = ("verbose",)


def __getattr__(name: str) -> Any:
    if name in _FROM_KERAS_TUNER:
        import keras_tuner

        return getattr(keras_tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Trial:
    """One finished trial, as ``oracle.get_best_trials`` returns it."""

    trial_id: str
    hyperparameters: FixedHP
    score: float | None
    status: str
    run_id: str | None = None


class _Oracle:
    """``tuner.oracle``: reads the tuner's trials from its Optuna study."""

    def __init__(self, tuner: Tuner) -> None:
        self._tuner = tuner

    def get_best_trials(self, num_trials: int = 1) -> list[Trial]:
        return self._tuner._best_trials(num_trials)


class _FunctionHyperModel:
    """``tuner.hypermodel`` for a ``build_model(hp)`` function: ``build(hp)`` and KerasTuner's
    default ``fit(hp, model, *args, **kwargs)`` (``model.fit``)."""

    def __init__(self, build: Any) -> None:
        self._build = build

    def build(self, hp: Any) -> Any:
        return self._build(hp)

    def fit(self, hp: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        return model.fit(*args, **kwargs)


@dataclass(frozen=True)
class _Objective:
    """An objective's name and direction, as ``keras_tuner.Objective`` gives them."""

    name: str
    direction: str


class _DropInSpace(HpSpace):
    """The hypermodel's space, with KerasTuner's compile overrides (``optimizer=``,
    ``loss=``, ``metrics=``) applied to each model built, and the ``search()`` callbacks and
    ``model.fit`` arguments handed to each trial's fit."""

    def __init__(self, *args: Any, compile_args: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compile_args = dict(compile_args)
        self.callbacks: list[Any] = []
        self.fit_args: dict[str, Any] = {}

    def builder(self, params: Mapping[str, Any]) -> Any:
        model = super().builder(params)
        if self.compile_args and getattr(model, "optimizer", None) is not None:
            recompile(model, self.compile_args)
        return model

    def fit_trial(self, params: Mapping[str, Any], model: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *self.callbacks]
        for name, value in self.fit_args.items():
            kwargs.setdefault(name, value)
        return super().fit_trial(params, model, *args, **kwargs)


class Tuner:
    """What the four tuners share; a subclass names its strategy."""

    strategy = "random"

    def __init__(
        self,
        hypermodel: Any = None,
        objective: Any = None,
        max_trials: int = 10,
        seed: int | None = None,
        hyperparameters: Any = None,
        tune_new_entries: bool = True,
        allow_new_entries: bool = True,
        max_retries_per_trial: int = 0,
        max_consecutive_failed_trials: int = 3,
        executions_per_trial: int = 1,
        directory: str | os.PathLike[str] | None = None,
        project_name: str | None = None,
        overwrite: bool = False,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = None,
        max_model_size: int | None = None,
        **unsupported: Any,
    ) -> None:
        _refuse(unsupported, max_retries_per_trial)
        if hypermodel is None:
            raise UnsupportedArgument(
                f"{type(self).__name__}() needs hypermodel=: a build_model(hp) function or a "
                "HyperModel (searchlab trains Keras models; a Tuner subclass with its own "
                "run_trial is not supported)."
            )
        self.objective = objective
        self.max_trials = max_trials
        self.seed = 0 if seed is None else int(seed)
        self.executions_per_trial = executions_per_trial
        self.max_consecutive_failed_trials = max_consecutive_failed_trials
        self.max_model_size = max_model_size
        self.project_name = project_name or "untitled_project"
        self.project_dir = Path(directory or ".").resolve() / self.project_name
        self.hypermodel = (
            hypermodel if is_hypermodel(hypermodel) else _FunctionHyperModel(hypermodel)
        )
        self.oracle = _Oracle(self)
        overrides = Overrides(
            _override_params(hyperparameters),
            tune_new_entries=bool(tune_new_entries),
            allow_new_entries=bool(allow_new_entries),
        )
        compile_args = {"optimizer": optimizer, "loss": loss, "metrics": metrics}
        compile_args = {k: v for k, v in compile_args.items() if v is not None}
        build = self.hypermodel.build if is_hypermodel(hypermodel) else hypermodel
        fit = own_fit(hypermodel) if is_hypermodel(hypermodel) else None
        label = (
            f"{type(hypermodel).__name__}.build(hp)"
            if is_hypermodel(hypermodel)
            else f"{getattr(hypermodel, '__name__', 'build_model')}(hp)"
        )
        self._user_fit = fit
        self._space_args = (build, overrides, label, compile_args)
        self._space = self._new_space(fit)
        self._last: Any = None  # the last search's (study, options)
        if overwrite:
            self._start_over()

    # -------------------------------------------------------------------- the stores
    @property
    def storage(self) -> str:
        return f"sqlite:///{self.project_dir / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.project_dir / 'mlflow.db'}"
        )

    def _start_over(self) -> None:
        """``overwrite=True``: remove the project's stores, and its runs in an MLflow store
        that lives elsewhere (``$MLFLOW_TRACKING_URI``)."""
        if os.environ.get("MLFLOW_TRACKING_URI"):
            from searchlab import tracking

            tracker = tracking.MlflowTracker(self.tracking_uri, self.project_dir / "mlartifacts")
            client = tracking.client(self.tracking_uri, create=False)
            for run in tracker.runs(self.project_name):
                client.delete_run(run.run_id)
        if self.project_dir.exists():
            shutil.rmtree(self.project_dir)

    def _new_space(self, fit: Any) -> _DropInSpace:
        build, overrides, label, compile_args = self._space_args
        return _DropInSpace(build, fit, overrides, label, compile_args=compile_args)

    # ------------------------------------------------------------------------ search
    def search_space_summary(self, extended: bool = False) -> None:
        names = set(self._space.names)
        described = {k: v for k, v in self._space.describe().items() if k in names}
        print("Search space summary")
        print(f"Default search space size: {len(described)}")
        for name, text in described.items():
            print(f"{name} ({text})")

    def search(
        self,
        x: Any = None,
        y: Any = None,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        validation_data: Any = None,
        validation_split: float | None = None,
        callbacks: Sequence[Any] | None = None,
        verbose: Any = "auto",
        **fit_args: Any,
    ) -> None:
        """Run the search (continue it up to ``max_trials``): each trial fits the model as
        ``model.fit(x, y, epochs=..., batch_size=..., validation_data=..., callbacks=...)``."""
        from searchlab import api, engines
        from searchlab.data import Dataset
        from searchlab.study import Study

        if x is None:
            raise UnsupportedArgument(
                "search() needs the training data: search(x, y, validation_data=(x_val, y_val)) "
                "with arrays, or search(dataset, validation_data=val_dataset)."
            )
        dataset = Dataset(loader=_loader(x, y, validation_data, validation_split),
                          validation=validation_split or "test", scale=False)  # fmt: skip
        space = self._space_for(list(callbacks or []), fit_args)
        epochs_per_trial, trials = self._budget(epochs)
        study = Study(
            name=self.project_name,
            space=space,
            model=space.builder,
            data=dataset,
            objective=self._objective(space),
            strategy=self.strategy,
            trials=trials,
            epochs=epochs_per_trial,
            seed=self.seed,
            batch_size=batch_size or 32,
            executions_per_trial=self.executions_per_trial,
            max_model_size=self.max_model_size,
        )
        options = engines.RunOptions(
            strategy=self.strategy,
            trials=trials,
            timeout=None,
            epochs=epochs_per_trial,
            seed=self.seed,
            storage=self.storage,
            max_failures=self.max_consecutive_failed_trials,
            allow_changed_settings=True,  # KerasTuner goes on with a project as it is given
            **self._pruning(),
        )
        self.project_dir.mkdir(parents=True, exist_ok=True)
        progress = api.ProgressBar(study.objective, enabled=verbose not in (0, False))
        self._last = (study, options)
        api.run_options(
            study, options, self.tracking_uri, progress,
            artifact_root=self.project_dir / "mlartifacts",
        )  # fmt: skip

    def _space_for(self, callbacks: list[Any], fit_args: dict[str, Any]) -> _DropInSpace:
        """The space whose trials get the search's callbacks and fit arguments: through the
        hypermodel's own fit, or KerasTuner's default fit (``model.fit``) when any are given."""
        for name in _OWN_FIT_ARGS:
            fit_args.pop(name, None)
        fit = self._user_fit
        if fit is None and (callbacks or fit_args):
            fit = self.hypermodel.fit if hasattr(self.hypermodel, "fit") else None
            fit = fit or _FunctionHyperModel(None).fit
            log.warning(
                "search(callbacks=/fit arguments): trials train through model.fit on the raw "
                "inputs with them, so the feature cache of a frozen prefix is off for this search"
            )
        space = self._space if fit == self._space.fit else self._new_space(fit)
        space.callbacks, space.fit_args = callbacks, fit_args
        self._space = space
        return space

    def _objective(self, space: HpSpace) -> Any:
        """The objective given; else, as KerasTuner, the number a hypermodel's fit returns
        (``default_objective``, minimised), and ``val_loss`` for any other model."""
        if self.objective is not None:
            return self.objective
        if space.fit is not None:
            space.describe()  # runs its fit dry: what it returns
            if space.fit_returns == "value":
                return _Objective(DEFAULT_OBJECTIVE, "min")
        return "val_loss"

    def _budget(self, epochs: int | None) -> tuple[int, int]:
        return epochs or 1, self.max_trials

    def _pruning(self) -> dict[str, Any]:
        return {}

    # ----------------------------------------------------------------------- results
    def _store(self) -> Any:
        from searchlab.store import StudyStore

        return StudyStore.load(self.project_name, self.storage)

    def _best_trials(self, n: int) -> list[Trial]:
        store = self._store()
        out = []
        for t in store.top(n):
            out.append(
                Trial(
                    trial_id=str(t.number),
                    hyperparameters=self._hp(t.params),
                    score=t.value,
                    status="COMPLETED",
                    run_id=t.run_id,
                )
            )
        return out

    def _hp(self, params: Mapping[str, Any]) -> FixedHP:
        hp = FixedHP(params, self._space.overrides)
        hp.values.update(params)
        return hp

    def get_best_hyperparameters(self, num_trials: int = 1) -> list[FixedHP]:
        """The best trials' hyperparameters, best first: ``.get(name)``, ``.values``, and
        usable as the ``hp`` of ``build_model(hp)`` (each call returns the trial's value)."""
        return [t.hyperparameters for t in self._best_trials(num_trials)]

    def get_best_models(self, num_models: int = 1) -> list[Any]:
        """The best trials' models, best first, with their best epoch's weights."""
        import tempfile

        from searchlab import runner, tracking

        if self._last is None:
            raise UnsupportedArgument(
                "get_best_models() needs the data the models were trained on: call search() in "
                "this process first (the trials stay in the stores either way)."
            )
        study, options = self._last
        spec = runner.trial_spec(study, options)
        tracker = tracking.MlflowTracker(self.tracking_uri, self.project_dir / "mlartifacts")
        models = []
        with tempfile.TemporaryDirectory(prefix="searchlab-kt-") as tmp:
            for i, t in enumerate(self._best_trials(num_models)):
                if t.run_id is not None:
                    weights = tracker.download(t.run_id, "weights", Path(tmp) / str(i))
                    models.append(_trained(spec, t.hyperparameters.fixed, weights))
        return models

    def results_summary(self, num_trials: int = 10) -> None:
        """Print the best trials as KerasTuner does: their hyperparameters and score."""
        store = self._store()
        objective = self._last[0] if self._last is not None else None
        print("Results summary")
        print(f"Results in {self.project_dir}")
        print(f"Showing {num_trials} best trials")
        if objective is not None:
            short = "max" if objective.goal == "maximize" else "min"
            print(f'Objective(name="{objective.objective}", direction="{short}")')
        for t in store.top(num_trials):
            print()
            print(f"Trial {t.number:0>{2}} summary")
            print("Hyperparameters:")
            for name, value in t.params.items():
                print(f"{name}: {value}")
            print(f"Score: {t.value}")


class RandomSearch(Tuner):
    """KerasTuner's ``RandomSearch``: Optuna's random sampler."""

    strategy = "random"


class GridSearch(Tuner):
    """KerasTuner's ``GridSearch``: every point of the code's grid once, up to ``max_trials``."""

    strategy = "grid"

    def __init__(self, hypermodel: Any = None, objective: Any = None,
                 max_trials: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(hypermodel, objective, max_trials or 0, **kwargs)
        if max_trials is None:
            self.max_trials = self._space.grid_size()


class BayesianOptimization(Tuner):
    """KerasTuner's ``BayesianOptimization``: Optuna's Gaussian-process sampler (its TPE
    sampler where PyTorch, which the GP sampler needs, is not installed)."""

    strategy = "gp"

    def __init__(self, hypermodel: Any = None, objective: Any = None, max_trials: int = 10,
                 num_initial_points: int | None = None, alpha: float = 1e-4, beta: float = 2.6,
                 **kwargs: Any) -> None:  # fmt: skip
        if num_initial_points is not None or alpha != 1e-4 or beta != 2.6:
            raise UnsupportedArgument(
                "BayesianOptimization(num_initial_points=/alpha=/beta=): Optuna's GP sampler "
                "picks its own start-up trials and kernel; drop these arguments."
            )
        super().__init__(hypermodel, objective, max_trials, **kwargs)
        try:
            import torch  # noqa: F401 - Optuna's GPSampler needs it
        except ImportError:
            log.warning(
                "BayesianOptimization: Optuna's GPSampler needs PyTorch (pip install "
                "'searchlab[gp]'); searching with its TPE sampler instead"
            )
            self.strategy = "bayesian"


class Hyperband(Tuner):
    """KerasTuner's ``Hyperband``: as many configurations as its brackets start, each
    trained up to ``max_epochs`` under Optuna's Hyperband pruner (reduction ``factor``), which
    stops the worse ones at its rungs as KerasTuner's brackets do."""

    strategy = "hyperband"

    def __init__(self, hypermodel: Any = None, objective: Any = None, max_epochs: int = 100,
                 factor: int = 3, hyperband_iterations: int = 1, **kwargs: Any) -> None:  # fmt: skip
        if "max_trials" in kwargs:
            raise UnsupportedArgument(
                "Hyperband() takes no max_trials (KerasTuner's neither): its brackets set the "
                "number of trials; lower max_epochs or factor for fewer."
            )
        if not isinstance(factor, int) or factor < 2:
            raise UnsupportedArgument(f"Hyperband(factor=) must be an int >= 2, got {factor!r}.")
        self.max_epochs, self.factor = int(max_epochs), factor
        trials = hyperband_trials(self.max_epochs, factor, int(hyperband_iterations))
        super().__init__(hypermodel, objective, trials, **kwargs)

    def _budget(self, epochs: int | None) -> tuple[int, int]:
        return self.max_epochs, self.max_trials  # as KerasTuner: its epochs, not search()'s

    def _pruning(self) -> dict[str, Any]:
        return {"pruner": "hyperband", "prune_factor": self.factor}


__all__ = [
    "BayesianOptimization",
    "GridSearch",
    "Hyperband",
    "RandomSearch",
    "Trial",
    "Tuner",
    "UnsupportedArgument",
    "hyperband_trials",
    "recompile",
]
