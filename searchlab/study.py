"""The ``Study`` spec and ``load_study(path)``, which imports a study file and checks it.

Example study file::

    from searchlab import Study, Int, Float, Choice

    def build(params, info):
        ...  # return a compiled keras.Model

    study = Study(
        name="mnist-dense",
        space={"units": Int(32, 256, step=32), "lr": Float(1e-4, 1e-2, log=True)},
        model=build,
        data="mnist",
    )
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchlab import config
from searchlab.data import Dataset
from searchlab.errors import DataError, SearchlabError, StudyDefinitionError
from searchlab.hp import (
    DEFAULT_OBJECTIVE,
    UNNAMED_OBJECTIVE,
    HpSpace,
    Overrides,
    is_hypermodel,
    own_fit,
)
from searchlab.space import Bool, Choice, Float, Int, Param, Space, as_space

log = logging.getLogger(__name__)
STRATEGIES = ("grid", "random", "bayesian", "gp", "hyperband")
DIRECTIONS = ("maximize", "minimize")
#: what a direction may be written as (KerasTuner's ``Objective`` says "max" / "min")
_DIRECTION_NAMES = {
    "maximize": "maximize",
    "max": "maximize",
    "minimize": "minimize",
    "min": "minimize",
}
#: How a metric's name tells its direction, as KerasTuner infers it: the name, without
#: ``val_`` / ``weighted_`` and Keras's ``_1`` suffix, is one of these or ends in ``_`` + one
#: (``out_loss``, ``sparse_categorical_accuracy``, ``mean_absolute_error``).
_MAXIMIZE = (
    "accuracy", "acc", "auc", "precision", "recall", "f1_score", "fbeta_score", "r2_score",
    "iou", "true_positives", "true_negatives", "sensitivity_at_specificity",
    "specificity_at_sensitivity", "precision_at_recall", "recall_at_precision",
)  # fmt: skip
_MINIMIZE = (
    "loss", "error", "mse", "mae", "mape", "msle", "rmse", "crossentropy", "hinge",
    "logcosh", "log_cosh", "kl_divergence", "kld", "kullback_leibler_divergence", "poisson",
    "huber", "false_positives", "false_negatives", "ctc", "dice", "tversky",
)  # fmt: skip


def infer_direction(objective: str) -> str | None:
    """``maximize`` or ``minimize`` as the metric's name tells (None: it does not), the way
    KerasTuner infers an objective's direction: losses and errors are minimised, accuracy,
    AUC, precision, recall and the like maximised."""
    name = objective.removeprefix("val_").removeprefix("weighted_")
    name = re.sub(r"_\d+$", "", name)
    best: tuple[int, str] | None = None
    for direction, tokens in (("maximize", _MAXIMIZE), ("minimize", _MINIMIZE)):
        for token in tokens:
            if (name == token or name.endswith("_" + token)) and (
                best is None or len(token) > best[0]
            ):
                best = (len(token), direction)
    return best[1] if best else None


def resolve_objective(objective: Any, direction: Any) -> tuple[str, str, str]:
    """The study's objective name and direction from what the study file gave: a metric name
    or a KerasTuner ``Objective(name, direction)``, and ``direction=`` (``maximize`` /
    ``minimize``, or ``max`` / ``min``) or None.  Returns (name, direction, how the direction
    was chosen); a list of objectives or an unknown direction is refused in one line."""
    if isinstance(objective, list | tuple):
        names = [getattr(o, "name", o) for o in objective]
        raise StudyDefinitionError(
            f"objective= lists {len(names)} objectives ({', '.join(map(str, names))}); searchlab "
            "optimises one. Pick one, e.g. objective='val_loss', or compile the model with a "
            "metric that combines them."
        )
    given = direction
    if not isinstance(objective, str):  # KerasTuner's Objective("name", direction="min")
        name, kt_direction = getattr(objective, "name", None), getattr(objective, "direction", None)
        if not isinstance(name, str) or kt_direction not in _DIRECTION_NAMES:
            raise StudyDefinitionError(
                f"objective must be a metric name such as 'val_accuracy' or a "
                f"keras_tuner.Objective, got {objective!r}."
            )
        kt_direction = _DIRECTION_NAMES[kt_direction]
        if given is not None and _DIRECTION_NAMES.get(given) != kt_direction:
            raise StudyDefinitionError(
                f"objective=Objective({name!r}, direction={objective.direction!r}) and "
                f"direction={given!r} disagree: give the direction once."
            )
        objective, given = name, kt_direction
    if not objective.strip():
        raise StudyDefinitionError("objective must name a metric, e.g. 'val_accuracy'.")
    if given is not None:
        if given not in _DIRECTION_NAMES:
            raise StudyDefinitionError(
                f"direction must be 'maximize' or 'minimize' (or 'max' / 'min'), got {given!r}."
            )
        return objective, _DIRECTION_NAMES[given], "given"
    inferred = infer_direction(objective)
    if inferred is None:
        raise StudyDefinitionError(
            f"Cannot tell from its name whether objective {objective!r} is to be maximised or "
            "minimised: add direction='maximize' or direction='minimize' to the Study."
        )
    return objective, inferred, "inferred from its name"


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise StudyDefinitionError(
            f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}."
        )
    return strategy


@dataclass(frozen=True)
class Study:
    """One hyperparameter search, as a study file declares it.

    Args:
        name: the study's name: its Optuna study and its MLflow experiment.
        space: parameter name -> ``Int`` / ``Float`` / ``Choice`` / ``Bool``; or ``None``
            when ``model`` declares its own parameters: a KerasTuner-style
            ``build_model(hp)``, a ``keras_tuner.HyperModel`` instance (its ``fit`` too) or an
            Optuna-style ``create_model(trial)`` (see ``searchlab.hp``).
        model: ``build(params)`` or ``build(params, info)`` returning a compiled
            ``keras.Model``; ``info`` has ``input_shape`` and ``num_classes`` (None for
            regression targets).  With ``space=None``: ``build_model(hp)``, a HyperModel, or
            ``create_model(trial)``.
        data: a dataset name (``"mnist"``) or a ``Dataset``.
        objective: the metric to optimise, as Keras reports it per epoch (``val_loss``,
            ``val_accuracy``, ...), or a ``keras_tuner.Objective(name, direction)``.  Not
            given: ``val_accuracy``; but a HyperModel whose ``fit`` returns one number (as
            keras-io's ``HyperRegressor`` returns its MAE) is minimised on that number, named
            ``default_objective``, as KerasTuner does.
        direction: ``"maximize"`` or ``"minimize"`` (``"max"`` / ``"min"``); None: inferred
            from the objective's name as KerasTuner does (losses and errors are minimised,
            accuracy, AUC, precision, recall ... maximised).
        strategy: default strategy: ``grid``, ``random``, ``bayesian`` (TPE) or ``gp``.
        trials: how many trials to complete (None: the whole grid, or until ``timeout``).
        timeout: stop starting new trials after this many seconds (None: no limit).
        epochs: epochs per trial.
        seed: seeds the sampler and every trial.
        batch_size: used when the space has no ``batch_size`` parameter.
        tags: extra tags for every MLflow run of the study.
        register: register each session's best model under this name in MLflow's model
            registry; its ``champion`` alias moves to a new version only when that one is
            better (``searchlab run --register NAME`` does the same).
        executions_per_trial: fit each configuration this many times (KerasTuner's
            averaging): every execution's metrics are logged, the trial's value is the mean.
        hyperparameters: (``space=None`` only) KerasTuner's ``hyperparameters=``: a
            ``keras_tuner.HyperParameters`` (or a dict name -> ``Int``/``Float``/``Choice``/
            ``Bool`` or a fixed value) that replaces or fixes what the code declares.
        tune_new_entries: (with ``hyperparameters``) False: parameters the code declares
            that ``hyperparameters`` does not list keep their default, unsearched.
        allow_new_entries: (with ``hyperparameters``) False: the code may declare only the
            listed parameters.
        max_model_size: a trial whose model has more parameters (scalars) fails before it
            trains, as in KerasTuner.
        cache: False: no trial trains on cached features of a frozen prefix (the feature
            cache applies to any model whose first layers are frozen: the user guide's
            "Transfer learning and the feature cache", docs/transfer.md).
        callbacks: Keras callbacks every trial's ``model.fit`` gets beside searchlab's own
            (``EarlyStopping``, ``ReduceLROnPlateau``, ``TerminateOnNaN``, yours): the trial
            still reports each epoch, prunes and keeps its best epoch's weights.  Trials then
            train through ``model.fit`` on the raw inputs, so the feature cache is off for
            them (said once, when the study is checked).
        backbone_seed: build every trial's model from this seed instead of the trial's own
            (which then drives only its fit: shuffling, dropout), so a randomly initialised
            frozen backbone (``weights=None``) is the same in every trial and its features are
            cached; the new layers' initial weights are then the same in every trial too.
    """

    name: str
    space: Mapping[str, Param] | HpSpace | None
    model: Callable[..., Any]
    data: str | Dataset
    objective: str = UNNAMED_OBJECTIVE
    direction: str | None = None
    strategy: str = "bayesian"
    trials: int | None = 20
    timeout: float | None = None
    epochs: int = 5
    seed: int = 0
    batch_size: int = 32
    tags: Mapping[str, str] = field(default_factory=dict)
    register: str | None = None
    executions_per_trial: int = 1
    hyperparameters: Any = None
    tune_new_entries: bool = True
    allow_new_entries: bool = True
    max_model_size: int | None = None
    cache: bool = True
    backbone_seed: int | None = None
    callbacks: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise StudyDefinitionError(f"Study name must be a non-empty string, got {self.name!r}.")
        self._check_model()
        overrides = Overrides(
            _override_params(self.hyperparameters),
            tune_new_entries=bool(self.tune_new_entries),
            allow_new_entries=bool(self.allow_new_entries),
        )
        if self.space is None or isinstance(self.space, HpSpace):
            # the model code is the space; trials rebuild from a params dict
            hp_space = self.space or _code_space(self.model, overrides)
            object.__setattr__(self, "space", hp_space)
            object.__setattr__(self, "model", hp_space.builder)
        else:
            if overrides.active:
                raise StudyDefinitionError(
                    "hyperparameters=, tune_new_entries= and allow_new_entries= tailor the "
                    "space that model code declares (space=None); with space={...} change the "
                    "space itself."
                )
            object.__setattr__(self, "space", as_space(self.space))
        for label in ("executions_per_trial", "max_model_size"):
            value = getattr(self, label)
            if (value is not None or label == "executions_per_trial") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise StudyDefinitionError(f"{label} must be a positive int, got {value!r}.")
        if not isinstance(self.cache, bool):
            raise StudyDefinitionError(f"cache must be True or False, got {self.cache!r}.")
        if self.backbone_seed is not None and (
            isinstance(self.backbone_seed, bool) or not isinstance(self.backbone_seed, int)
        ):
            raise StudyDefinitionError(
                f"backbone_seed must be an int (or None: each trial's own seed), got "
                f"{self.backbone_seed!r}."
            )
        self._check_callbacks()
        data = Dataset(self.data) if isinstance(self.data, str) else self.data
        if not isinstance(data, Dataset):
            raise StudyDefinitionError(
                f"Study data must be a dataset name or a Dataset, got {type(self.data).__name__}."
            )
        try:
            data.check()
        except DataError as exc:
            raise StudyDefinitionError(str(exc)) from exc
        object.__setattr__(self, "data", data)
        objective, direction, how = self._objective_of_fit() or resolve_objective(
            self.objective, self.direction
        )
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "_direction_source", how)
        log.info("study %s: objective %s, %s (%s)", self.name, objective, direction, how)
        check_strategy(self.strategy)
        for label in ("trials", "epochs"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StudyDefinitionError(f"{label} must be a positive int, got {value!r}.")
        if self.epochs is None:
            raise StudyDefinitionError("epochs must be a positive int, got None.")
        if self.timeout is not None and self.timeout <= 0:
            raise StudyDefinitionError(f"timeout must be > 0 seconds, got {self.timeout!r}.")
        if self.register is not None and (
            not isinstance(self.register, str) or not self.register.strip()
        ):
            raise StudyDefinitionError(
                f"register must be a registered model name (a non-empty string), got "
                f"{self.register!r}."
            )

    def _objective_of_fit(self) -> tuple[str, str, str] | None:
        """KerasTuner's objective where the study names none and its HyperModel's ``fit``
        returns one number (read from a dry run of it): that number, as
        ``default_objective``, minimised (unless ``direction=`` says otherwise)."""
        space = self.space
        if self.objective is not UNNAMED_OBJECTIVE or not isinstance(space, HpSpace):
            return None
        if space.fit is None:
            return None
        space.describe()  # runs fit dry: what it returns
        if space.fit_returns != "value":
            return None
        if self.direction is None:
            how = "the number HyperModel.fit returns, minimised as in KerasTuner"
            return DEFAULT_OBJECTIVE, "minimize", how
        name, direction, _ = resolve_objective(DEFAULT_OBJECTIVE, self.direction)
        return name, direction, "given; the number HyperModel.fit returns"

    def _check_model(self) -> None:
        model = self.model
        if isinstance(model, type) and hasattr(model, "build"):
            raise StudyDefinitionError(
                f"model={model.__name__} is a class: pass an instance, model={model.__name__}()."
            )
        if is_hypermodel(model):
            if self.space is not None and not isinstance(self.space, HpSpace):
                raise StudyDefinitionError(
                    f"model={type(model).__name__}() is a HyperModel, which declares its own "
                    "hyperparameters: give space=None."
                )
            return
        if not callable(model):
            raise StudyDefinitionError(
                f"Study model must be a function build(params) -> compiled keras.Model, "
                f"build_model(hp) or a keras_tuner.HyperModel, got {type(model).__name__}."
            )
        declared = self.space is not None and not isinstance(self.space, HpSpace)
        problem = _signature_problem(model, declared)
        if problem:
            raise StudyDefinitionError(problem)

    def _check_callbacks(self) -> None:
        given = self.callbacks
        if isinstance(given, str | bytes) or not isinstance(given, Sequence):
            raise StudyDefinitionError(
                f"callbacks must be a list of keras.callbacks.Callback, got {given!r}."
            )
        for callback in given:
            if not callable(getattr(callback, "set_model", None)):
                raise StudyDefinitionError(
                    f"callbacks: {callback!r} is not a Keras callback (a "
                    "keras.callbacks.Callback, e.g. keras.callbacks.EarlyStopping(...))."
                )
        object.__setattr__(self, "callbacks", tuple(given))
        if given:
            from searchlab.training.cache import TransferBuilder

            if isinstance(self.model, TransferBuilder):
                raise StudyDefinitionError(
                    "callbacks= reach model.fit of a plain model or a HyperModel; a Transfer "
                    "model trains in phases searchlab fits itself, which do not take them yet: "
                    "drop callbacks= (its trials already stop on a NaN loss and keep their best "
                    "epoch), or build the model in build_model(hp)."
                )
            log.warning(
                "study %s: callbacks= are passed to model.fit in each trial, so its trials "
                "train on the raw inputs: the feature cache of a frozen prefix is off",
                self.name,
            )

    @property
    def fit(self) -> Callable[..., Any] | None:
        """``fit_trial(params, model, *args, **kwargs)`` when the study's HyperModel has its
        own ``fit`` or the study has ``callbacks``; None: trials call ``model.fit``."""
        space = self.search_space
        own = space.fit_trial if isinstance(space, HpSpace) and space.fit else None
        if not self.callbacks:
            return own
        return _WithCallbacks(own, tuple(self.callbacks))

    @property
    def goal(self) -> str:
        """The direction used (``maximize`` / ``minimize``) once the study is checked."""
        assert self.direction in DIRECTIONS
        return self.direction

    @property
    def direction_source(self) -> str:
        """How the direction was chosen: ``given``, or ``inferred from its name``."""
        return str(getattr(self, "_direction_source", "given"))

    @property
    def dataset(self) -> Dataset:
        assert isinstance(self.data, Dataset)
        return self.data

    @property
    def search_space(self) -> Space | HpSpace:
        assert isinstance(self.space, Space | HpSpace)
        return self.space


@dataclass(frozen=True)
class _WithCallbacks:
    """A trial's fit, ``fit(params, model, x, y, **kwargs)``, with the study's callbacks
    after searchlab's own in ``kwargs['callbacks']``: through the HyperModel's own fit
    (``own``) or ``model.fit``."""

    own: Callable[..., Any] | None
    callbacks: tuple[Any, ...]

    def __call__(self, params: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *self.callbacks]
        if self.own is not None:
            return self.own(params, model, *args, **kwargs)
        return model.fit(*args, **kwargs)


def _user_function(model: Any) -> Any:
    """The user's own function behind ``model``: a ``functools.partial``'s ``func``."""
    while isinstance(model, functools.partial):
        model = model.func
    return model


def _signature_problem(model: Any, declared: bool) -> str | None:
    """Why ``model`` cannot be called the way searchlab calls a builder (``build_model(hp)``
    or ``create_model(trial)`` with space=None, ``build(params[, info])`` with a declared
    space), in one line naming the user's function and where it is; None when it can."""
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):  # a builtin: nothing to read, the trial will say
        return None
    arities = (1, 2) if declared else (1,)
    for n in arities:
        try:
            signature.bind(*range(n))
            return None
        except TypeError:
            continue
    func = _user_function(model)
    name = getattr(func, "__name__", type(func).__name__)
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    where = f"{code.co_filename}, line {code.co_firstlineno}: " if code is not None else ""
    shown = f"functools.partial({name}, ...)" if func is not model else name
    expected = (
        "build(params) or build(params, info) (space={...} is given)"
        if declared
        else "build_model(hp) (KerasTuner) or create_model(trial) (Optuna)"
    )
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    keep = next((p for p in required if p in ("hp", "trial", "params")), None)
    bind = [p for p in required if p != (keep or required[-1])] if required else []
    fix = (
        f"give the others first, e.g. model=functools.partial({name}, "
        + ", ".join(f"{p}=..." for p in bind)
        + ")"
        if bind
        else "make it take one argument, the hyperparameters"
    )
    return (
        f"{where}model={shown} cannot be called as a builder: searchlab calls {expected}, "
        f"but it takes {shown}{signature}. {fix[0].upper()}{fix[1:]}."
    )


def _code_space(model: Any, overrides: Overrides) -> HpSpace:
    """The space of model code: a HyperModel's ``build`` (and its own ``fit``), or a
    ``build_model(hp)`` / ``create_model(trial)`` function."""
    if is_hypermodel(model):
        label = f"{type(model).__name__}.build(hp)"
        return HpSpace(model.build, fit=own_fit(model), overrides=overrides, label=label)
    name = getattr(_user_function(model), "__name__", "build_model")
    return HpSpace(model, overrides=overrides, label=f"{name}(hp)")


def _override_params(given: Any) -> dict[str, Any]:
    """KerasTuner's ``hyperparameters=`` (a ``HyperParameters``) or a dict, as name -> our
    ``Int``/``Float``/``Choice``/``Bool`` or a fixed value."""
    if given is None:
        return {}
    if isinstance(given, Mapping):
        out = dict(given)
        for name, value in out.items():
            if isinstance(value, Int | Float | Choice | Bool):
                value.check(name)
            elif value is not None and not isinstance(value, bool | int | float | str):
                raise StudyDefinitionError(
                    f"hyperparameters[{name!r}] must be Int/Float/Choice/Bool or a fixed value, "
                    f"got {value!r}."
                )
        return out
    space = getattr(given, "space", None)
    if space is None:
        raise StudyDefinitionError(
            "hyperparameters= must be a keras_tuner.HyperParameters or a dict, got "
            f"{type(given).__name__}."
        )
    out = {}
    for hp in space:
        kind, name = type(hp).__name__, hp.name
        if getattr(hp, "conditions", None):
            raise StudyDefinitionError(
                f"hyperparameters=: {name!r} is conditional; searchlab takes unconditional "
                "entries there. Declare the condition in the model code instead."
            )
        log_scale = getattr(hp, "sampling", "linear") in ("log", "reverse_log")
        if kind == "Fixed":
            out[name] = hp.value
        elif kind == "Int":
            out[name] = Int(hp.min_value, hp.max_value, step=hp.step or 1, log=log_scale)
        elif kind == "Float":
            step = None if log_scale else hp.step
            out[name] = Float(hp.min_value, hp.max_value, log=log_scale, step=step)
        elif kind == "Choice":
            out[name] = Choice(list(hp.values))
        elif kind == "Boolean":
            out[name] = Bool()
        else:
            raise StudyDefinitionError(f"hyperparameters=: {name!r} is a {kind}, not supported.")
    for name, value in out.items():
        if isinstance(value, Int | Float | Choice | Bool):
            value.check(name)
    return out


#: KerasTuner ``Tuner`` arguments a study file may carry over, and what to write instead.
KERAS_TUNER_ARGS = {
    "hypermodel": "model=",
    "max_trials": "trials=",
    "max_epochs": "epochs=",
    "project_name": "name=",
    "directory": "$SEARCHLAB_HOME (or run from another folder)",
    "overwrite": "a new name= (a study is continued, never overwritten)",
    "max_retries_per_trial": "--max-failures",
    "max_consecutive_failed_trials": "--max-failures",
    "tuner": "--engine keras-tuner --strategy grid|random|bayesian|hyperband",
    "oracle": "--engine keras-tuner --strategy grid|random|bayesian|hyperband",
    "distribution_strategy": "one worker per GPU (--gpus)",
    "logger": "MLflow (searchlab ui)",
    "num_initial_points": "--strategy bayesian (its start-up trials)",
    "factor": "--prune-factor",
    "hyperband_iterations": "--trials",
}


def _unexpected_argument(exc: BaseException) -> str | None:
    """For ``Study(...)`` called with a KerasTuner ``Tuner`` argument: what to write."""
    match = re.search(r"Study\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(exc))
    if match is None:
        return None
    name = match.group(1)
    instead = KERAS_TUNER_ARGS.get(name)
    if instead is None:
        return f"Study has no argument {name!r}"
    return f"Study has no argument {name!r} (a KerasTuner Tuner argument): use {instead}"


def load_study(path: str | Path) -> Study:
    """Import a study file and return the ``Study`` it defines.

    The file must define exactly one ``Study`` (or several, one of them named ``study``).
    Every problem is one ``StudyDefinitionError`` naming the file (and the line, where known).
    """
    path = Path(path)
    if not path.is_file():
        raise StudyDefinitionError(
            f"Study file {path} not found. Pass the path of a .py file that defines "
            "`study = Study(...)`, e.g. studies/mnist_dense.py."
        )
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise StudyDefinitionError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}). Save the study file as UTF-8."
        ) from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise StudyDefinitionError(
            f"{path}, line {exc.lineno}: syntax error: {exc.msg}. Fix the study file."
        ) from None
    module_name = f"searchlab_study_{path.stem}".replace("-", "_")
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path.resolve())
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        with config.loading_study(str(path)):  # the settings it reads are its own (``setting``)
            exec(code, module.__dict__)  # noqa: S102 - a study file is the user's own code
    except SearchlabError as exc:
        raise type(exc)(f"{path}, line {_line_in(exc, path)}: {exc}") from None
    except SystemExit as exc:  # exit() at import time would end searchlab without a word
        raise StudyDefinitionError(
            f"{path}, line {_line_in(exc, path)}: the study file calls sys.exit({exc.code!r}) "
            'when it is imported. Put script code under `if __name__ == "__main__":`.'
        ) from None
    except Exception as exc:
        instead = _unexpected_argument(exc) if isinstance(exc, TypeError) else None
        if isinstance(exc, ModuleNotFoundError) and exc.name == "tf_keras":
            instead = (
                "it imports tf_keras (Keras 2, TF_USE_LEGACY_KERAS=1), which is not installed; "
                "searchlab needs Keras 3: `import keras` and unset TF_USE_LEGACY_KERAS"
            )
        if instead:
            raise StudyDefinitionError(f"{path}, line {_line_in(exc, path)}: {instead}.") from None
        raise StudyDefinitionError(
            f"{path}, line {_line_in(exc, path)}: {type(exc).__name__}: {exc}. Fix the study file."
        ) from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    studies = {k: v for k, v in vars(module).items() if isinstance(v, Study)}
    if "study" in studies:
        return studies["study"]
    if len(studies) == 1:
        return next(iter(studies.values()))
    if not studies:
        raise StudyDefinitionError(
            f"{path} defines no Study. Add `study = Study(name=..., space=..., model=..., "
            "data=...)` (from searchlab import Study)."
        )
    raise StudyDefinitionError(
        f"{path} defines several studies ({', '.join(sorted(studies))}); name the one to run `study`."
    )


def _line_in(exc: BaseException, path: Path) -> str:
    target = str(path)
    line = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == target:
            line = str(frame.lineno)
    return line
