"""Spaces defined by users' own model code: ``build_model(hp)``, HyperModels, ``create_model(trial)``.

A study may give ``space=None`` and a function that declares its parameters while it builds:

* KerasTuner's ``build_model(hp)``: ``hp.Int``, ``hp.Float``, ``hp.Choice``, ``hp.Boolean``,
  ``hp.Fixed``, ``hp.conditional_scope`` and ``parent_name=`` / ``parent_values=``;
* a ``keras_tuner.HyperModel`` (its ``build(hp)``, and its ``fit(hp, model, *args, **kwargs)``
  when it has one: parameters ``fit`` declares are searched too);
* Optuna's ``create_model(trial)``: the same ``hp`` object answers ``trial.suggest_int``,
  ``suggest_float(log=, step=)`` and ``suggest_categorical``.

``HpSpace`` wraps such code so the engines treat it like a declarative ``Space``:

* ``suggest(trial)``: declares every parameter through Optuna's ``trial.suggest_*``
  (define-by-run, so conditional parameters follow) and returns the params dict sampled;
* ``to_hp(hp)``: declares them on keras-tuner's own ``HyperParameters``;
* ``grid()``: enumerates every path through the code (one call per grid point), or refuses
  a continuous float, or a space larger than ``MAX_GRID`` with its size, in one line;
* ``builder(params)`` rebuilds the model from a params dict by replaying it, and
  ``fit_trial`` calls the HyperModel's ``fit`` with the same values inside a trial.

None of these builds a Keras model outside a trial.  The user's function runs as a *dry
run*: the same code with every Keras / TensorFlow (and other framework) name of its module
replaced by a stand-in that accepts any call and builds nothing, so only the ``hp`` calls do
real work (a 20-layer ``build_model`` enumerates thousands of points in a second, and a
builder that downloads ImageNet weights downloads nothing).  A stand-in refuses to decide
control flow (``if``, ``for``, ``len``, comparisons, ``str``): code whose parameters depend on
a framework value cannot be dry-run, and is then called for real, as before (logged).  A
``HyperModel.fit`` is probed the same way, with stand-ins for the model and the data, until
its first use of them decides something.  Whatever the user's code raises outside a trial is
one ``StudyDefinitionError`` naming the file, the line, the problem and the fix.

Inactive parameters read as ``None`` (KerasTuner's rule).  Nothing here imports Optuna,
keras-tuner or Keras.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import logging
import traceback
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from searchlab.errors import SearchlabError, SpaceError, StudyDefinitionError
from searchlab.space import Bool, Choice, Float, Int, Param, Value

log = logging.getLogger(__name__)
#: The most grid points a ``build_model(hp)`` study may enumerate.
MAX_GRID = 5000
#: Dry runs spent counting a space too large to enumerate, before saying "more than".
MAX_COUNT_CALLS = 20_000
#: Packages whose names a dry run replaces by stand-ins.
FRAMEWORKS = frozenset(
    {
        "keras",
        "tensorflow",
        "tf_keras",
        "keras_tuner",
        "keras_hub",
        "keras_nlp",
        "keras_cv",
        "tensorflow_hub",
        "tensorflow_datasets",
        "jax",
        "flax",
        "optax",
        "torch",
        "torchvision",
    }
)
#: What an Optuna ``objective(trial)`` (trains and returns a value) is told to do instead.
SPLIT_OBJECTIVE = (
    "searchlab trains the model itself: split it into create_model(trial) that returns the "
    "compiled keras.Model (model=create_model, space=None), the data (data=Dataset(loader=...)) "
    "and the metric it returned (objective='val_accuracy')"
)

#: The objective of a HyperModel whose ``fit`` returns one number, in a study that names
#: none: KerasTuner's name (its ``DefaultObjective``), minimised as KerasTuner does.
DEFAULT_OBJECTIVE = "default_objective"


class UnnamedObjective(str):
    """The objective of a study that names none (``Study``'s default, ``val_accuracy``): a
    ``str`` that says it was not chosen, so that a trial whose ``HyperModel.fit`` returns a
    number does not maximise that number under this name (``training.userfit``)."""

    __slots__ = ()


UNNAMED_OBJECTIVE = UnnamedObjective("val_accuracy")


class _Condition:
    def __init__(self, parent: str, values: Sequence[Value]) -> None:
        self.parent = parent
        self.values = tuple(values) if isinstance(values, list | tuple | set) else (values,)


class Overrides:
    """KerasTuner's ``hyperparameters=`` / ``tune_new_entries=`` / ``allow_new_entries=``:
    parameters declared in advance (a fixed value, or a range that replaces the code's own),
    whether the code's other parameters are searched (else they keep their default), and
    whether the code may declare parameters not listed at all."""

    def __init__(
        self,
        params: Mapping[str, Param | Value] | None = None,
        tune_new_entries: bool = True,
        allow_new_entries: bool = True,
    ) -> None:
        self.params = dict(params or {})
        self.tune_new_entries = tune_new_entries
        self.allow_new_entries = allow_new_entries

    @property
    def active(self) -> bool:
        return bool(self.params) or not self.tune_new_entries or not self.allow_new_entries

    def describe(self) -> dict[str, str]:
        out = {
            f"hyperparameters.{k}": v.describe()
            if isinstance(v, Int | Float | Choice | Bool)
            else f"fixed {v!r}"
            for k, v in self.params.items()
        }
        if not self.tune_new_entries:
            out["tune_new_entries"] = "False"
        if not self.allow_new_entries:
            out["allow_new_entries"] = "False"
        return out


def _is_param(value: Any) -> bool:
    return isinstance(value, Int | Float | Choice | Bool)


class HP:
    """The ``hp`` object users' code receives: KerasTuner's ``HyperParameters`` API and
    Optuna's ``Trial.suggest_*`` API on one object.

    Subclasses decide how a value is picked (``_pick``); this class keeps the values, the
    conditions and the declared parameters (``declared``).
    """

    def __init__(self, overrides: Overrides | None = None) -> None:
        self.values: dict[str, Value] = {}
        self.declared: dict[str, Param] = {}
        self.overrides = overrides or Overrides()
        self._scopes: list[_Condition] = []

    # KerasTuner's public methods -------------------------------------------------------
    def Int(  # noqa: N802 - KerasTuner's names
        self,
        name: str,
        min_value: int,
        max_value: int,
        step: int | None = None,
        sampling: str = "linear",
        default: int | None = None,
        parent_name: str | None = None,
        parent_values: Any = None,
    ) -> Any:  # the value, or None when inactive
        log = _log(name, sampling)
        param = Int(int(min_value), int(max_value), step=int(step or 1), log=log)
        return self._value(
            name, param, min_value if default is None else default, parent_name, parent_values
        )

    def Float(  # noqa: N802
        self,
        name: str,
        min_value: float,
        max_value: float,
        step: float | None = None,
        sampling: str = "linear",
        default: float | None = None,
        parent_name: str | None = None,
        parent_values: Any = None,
    ) -> Any:  # the value, or None when inactive
        log = _log(name, sampling)
        param = Float(
            float(min_value),
            float(max_value),
            log=log,
            step=float(step) if step is not None and not log else None,
        )
        return self._value(
            name, param, min_value if default is None else default, parent_name, parent_values
        )

    def Choice(  # noqa: N802
        self,
        name: str,
        values: Sequence[Value],
        ordered: bool | None = None,
        default: Value = None,
        parent_name: str | None = None,
        parent_values: Any = None,
    ) -> Value:
        param = Choice(list(values))
        return self._value(
            name, param, values[0] if default is None else default, parent_name, parent_values
        )

    def Boolean(  # noqa: N802
        self,
        name: str,
        default: bool = False,
        parent_name: str | None = None,
        parent_values: Any = None,
    ) -> Any:  # the value, or None when inactive
        return self._value(name, Bool(), bool(default), parent_name, parent_values)

    def Fixed(  # noqa: N802
        self, name: str, value: Value, parent_name: str | None = None, parent_values: Any = None
    ) -> Value:
        """KerasTuner's ``hp.Fixed``: not searched, but the trial's params show it and
        ``hp.get(name)`` reads it (a name declared before keeps its value)."""
        with self._maybe_scope(parent_name, parent_values):
            if not self._active():
                return None
            if name in self.declared or name in self.values:
                return self.values.get(name)
            self.values[name] = value
            return value

    @contextlib.contextmanager
    def conditional_scope(self, parent_name: str, parent_values: Any) -> Iterator[None]:
        """Parameters declared inside are active only when ``parent_name`` is in ``parent_values``."""
        if parent_name not in self.declared and parent_name not in self.values:
            raise SpaceError(
                f"hp.conditional_scope({parent_name!r}, ...): {parent_name!r} is not declared "
                "before the scope. Declare it first (e.g. hp.Choice(...))."
            )
        self._scopes.append(_Condition(parent_name, parent_values))
        try:
            yield
        finally:
            self._scopes.pop()

    def get(self, name: str) -> Value:
        if name not in self.values:
            raise SpaceError(f"hp.get({name!r}): no parameter {name!r} was declared before.")
        return self.values[name]

    def __getitem__(self, name: str) -> Value:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    # Optuna's Trial API ------------------------------------------------------------------
    def suggest_int(
        self, name: str, low: int, high: int, step: int = 1, log: bool = False
    ) -> Any:  # the value
        """Optuna's ``trial.suggest_int(name, low, high, step=1, log=False)``."""
        param = Int(int(low), int(high), step=int(step), log=bool(log))
        return self._value(name, param, int(low), None, None)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> Any:  # the value
        """Optuna's ``trial.suggest_float(name, low, high, step=None, log=False)``."""
        param = Float(float(low), float(high), log=bool(log), step=step)
        return self._value(name, param, float(low), None, None)

    def suggest_categorical(self, name: str, choices: Sequence[Value]) -> Value:
        """Optuna's ``trial.suggest_categorical(name, choices)``."""
        return self._value(name, Choice(list(choices)), list(choices)[0], None, None)

    @property
    def params(self) -> dict[str, Value]:
        """Optuna's ``trial.params``: the values declared so far."""
        return dict(self.values)

    def report(self, value: float, step: int) -> None:
        """Optuna's ``trial.report``: only an ``objective(trial)`` that trains calls it."""
        raise StudyDefinitionError(
            f"The study's model function calls trial.report(): it is an Optuna objective. "
            f"{SPLIT_OBJECTIVE}."
        )

    def should_prune(self) -> bool:
        """Optuna's ``trial.should_prune``: only an ``objective(trial)`` calls it."""
        raise StudyDefinitionError(
            f"The study's model function calls trial.should_prune(): it is an Optuna "
            f"objective. {SPLIT_OBJECTIVE}; searchlab prunes with --pruner."
        )

    # internals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _maybe_scope(self, parent_name: str | None, parent_values: Any) -> Iterator[None]:
        if parent_name is None:
            yield
        else:
            with self.conditional_scope(parent_name, parent_values):
                yield

    def _active(self) -> bool:
        return all(self.values.get(c.parent) in c.values for c in self._scopes)

    def _value(
        self, name: str, param: Param, default: Value, parent_name: str | None, parent_values: Any
    ) -> Value:
        with self._maybe_scope(parent_name, parent_values):
            if not self._active():
                return None  # KerasTuner's rule: an inactive parameter reads as None
            if name in self.declared or name in self.values:
                # declared twice (e.g. in a loop, or in build and again in fit): the first holds
                return self.values.get(name)
            rules = self.overrides
            if name in rules.params:
                given = rules.params[name]
                if not _is_param(given):  # KerasTuner's hp.Fixed in hyperparameters=
                    self.values[name] = given  # type: ignore[assignment]
                    return given  # type: ignore[return-value]
                param = given  # type: ignore[assignment]
            elif not rules.allow_new_entries:
                raise SpaceError(
                    f"The model code declares hyperparameter {name!r}, which hyperparameters= "
                    "does not list, and allow_new_entries=False. List it in hyperparameters=, "
                    "or drop allow_new_entries=False."
                )
            elif not rules.tune_new_entries:
                self.values[name] = default  # KerasTuner: not searched, its default
                return default
            param.check(name)
            value = self._pick(name, param, default)
            self.declared[name] = param
            self.values[name] = value
            return value

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        return default


def _log(name: str, sampling: str | None) -> bool:
    sampling = (sampling or "linear").lower()
    if sampling not in ("linear", "log", "reverse_log"):
        raise SpaceError(
            f"hp parameter {name!r}: sampling must be 'linear', 'log' or 'reverse_log', "
            f"got {sampling!r}."
        )
    return sampling != "linear"  # reverse_log is sampled on a log scale too


class SuggestHP(HP):
    """Every declaration becomes ``trial.suggest_*`` on an Optuna(-like) trial."""

    def __init__(self, trial: Any, overrides: Overrides | None = None) -> None:
        super().__init__(overrides)
        self.trial = trial

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        return param.suggest(name, self.trial)


class FixedHP(HP):
    """Replays a params dict; a parameter missing from it takes its default (and is listed
    in ``missing``: the code declared it where the space did not)."""

    def __init__(self, params: Mapping[str, Value], overrides: Overrides | None = None) -> None:
        super().__init__(overrides)
        self.fixed = dict(params)
        self.missing: list[str] = []

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        if name not in self.fixed:
            self.missing.append(name)
        return self.fixed.get(name, default)


class _PathHP(HP):
    """Picks the ``path[i]``-th grid value for the i-th parameter met (0 past the path)."""

    def __init__(self, path: Sequence[int], overrides: Overrides | None = None) -> None:
        super().__init__(overrides)
        self.path = list(path)
        self.sizes: list[int] = []
        self.names: list[str] = []

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        try:
            options = param.grid_values(name)
        except SpaceError:
            raise SpaceError(
                f"Grid search cannot enumerate hp.Float({name!r}, ...) of build_model(hp): it is "
                "continuous. Give it step=..., or use hp.Choice with the values to try, or use "
                "--strategy random."
            ) from None
        i = len(self.sizes)
        index = self.path[i] if i < len(self.path) else 0
        self.sizes.append(len(options))
        self.names.append(name)
        return options[index]


# -- dry runs ------------------------------------------------------------------------------


class _Unsure(Exception):  # noqa: N818 - internal signal, never leaves this module
    """A dry run met a framework value where it would decide control flow."""


class _Stub:
    """Stands in for every framework object in a dry run: any attribute, call, item or
    arithmetic gives another stand-in; deciding anything (``bool``, ``len``, iteration,
    comparison, ``str``) raises ``_Unsure``.  Calls are recorded (``fit`` means training)."""

    __slots__ = ("_calls", "_path")
    _calls: list[str]
    _path: str

    def __init__(self, path: str, calls: list[str]) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, name: str) -> _Stub:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self._path}.{name}", self._calls)

    def __setattr__(self, name: str, value: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        self._calls.append(self._path)
        return _Stub(f"{self._path}()", self._calls)

    def __getitem__(self, key: Any) -> _Stub:
        return _Stub(f"{self._path}[]", self._calls)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __enter__(self) -> _Stub:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __mro_entries__(self, bases: tuple) -> tuple:
        raise _Unsure(f"a class derives from {self._path}")

    def _unsure(self, *args: Any) -> Any:
        raise _Unsure(self._path)

    def _same(self, *args: Any) -> _Stub:
        return self

    __bool__ = __len__ = __iter__ = __contains__ = _unsure
    __int__ = __float__ = __index__ = __complex__ = _unsure
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _unsure
    __str__ = __repr__ = __format__ = __bytes__ = __fspath__ = _unsure
    __hash__ = object.__hash__
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __matmul__ = __rmatmul__ = __truediv__ = __rtruediv__ = __floordiv__ = _same
    __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = _same
    __abs__ = __invert__ = __and__ = __rand__ = __or__ = __ror__ = __xor__ = _same


def _framework_value(value: Any) -> bool:
    """Whether a module global belongs to a framework a dry run replaces."""
    if isinstance(value, types.ModuleType):
        return value.__name__.split(".")[0] in FRAMEWORKS
    if isinstance(value, type):
        return any(
            str(getattr(c, "__module__", "")).split(".")[0] in FRAMEWORKS for c in value.__mro__
        )
    module = getattr(value, "__module__", None) if callable(value) else None
    module = module or getattr(type(value), "__module__", "")
    return str(module).split(".")[0] in FRAMEWORKS


def _no_print(*args: Any, **kwargs: Any) -> None:
    """``print`` in a dry run: the user's code prints when searchlab calls it for real."""


class _DryRun:
    """Dry versions of a module's functions: the same code, framework names replaced."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._globals: dict[int, dict[str, Any]] = {}

    def function(self, fn: Callable[..., Any]) -> Callable[..., Any] | None:
        """The dry version of a function or bound method, or None (not plain Python code)."""
        func = getattr(fn, "__func__", fn)
        if not isinstance(func, types.FunctionType):
            return None
        dry = self._rebind(func)
        owner = getattr(fn, "__self__", None)
        return dry.__get__(owner) if owner is not None else dry

    def _rebind(self, func: types.FunctionType) -> types.FunctionType:
        dry = types.FunctionType(
            func.__code__,
            self._module(func.__globals__),
            func.__name__,
            func.__defaults__,
            func.__closure__,
        )
        dry.__kwdefaults__ = func.__kwdefaults__
        return dry

    def _module(self, real: dict[str, Any]) -> dict[str, Any]:
        key = id(real)
        if key in self._globals:
            return self._globals[key]
        fake: dict[str, Any] = {}
        self._globals[key] = fake
        for name, value in real.items():
            if name == "__builtins__":
                fake[name] = self._builtins(value)
            elif isinstance(value, types.FunctionType) and value.__globals__ is real:
                fake[name] = self._rebind(value)  # the module's own helpers, dry too
            elif _framework_value(value):
                fake[name] = _Stub(name, self.calls)
            else:
                fake[name] = value
        return fake

    def _builtins(self, real: Any) -> dict[str, Any]:
        names = dict(vars(real)) if isinstance(real, types.ModuleType) else dict(real)
        real_import = names.get("__import__", builtins.__import__)
        calls = self.calls

        def dry_import(name: str, *args: Any, **kwargs: Any) -> Any:
            if name.split(".")[0] in FRAMEWORKS:
                return _Stub(name.split(".")[0], calls)
            return real_import(name, *args, **kwargs)

        names["__import__"] = dry_import
        names["print"] = _no_print  # a dry run is no call of the user's: it says nothing
        return names


# -- the space -----------------------------------------------------------------------------


def _where(fn: Callable[..., Any]) -> tuple[str, int]:
    while isinstance(fn, functools.partial):  # the user's own function, where it is
        fn = fn.func
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None:
        return "?", 0
    return code.co_filename, code.co_firstlineno


def _line_of(exc: BaseException, filename: str, default: int) -> int:
    line = default
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename and frame.lineno is not None:
            line = frame.lineno
    return line


def is_hypermodel(model: Any) -> bool:
    """A KerasTuner ``HyperModel`` (or an object shaped like one): a ``build`` method, not
    a plain function."""
    return not inspect.isroutine(model) and not isinstance(model, type) and hasattr(model, "build")


def own_fit(model: Any) -> Callable[..., Any] | None:
    """The HyperModel's own ``fit`` (one its class or a base outside keras_tuner defines),
    or None: KerasTuner's default ``fit`` only calls ``model.fit(*args, **kwargs)``."""
    for cls in type(model).__mro__:
        if "fit" in vars(cls):
            if str(cls.__module__).split(".")[0] == "keras_tuner":
                return None
            return getattr(model, "fit", None)
    return None


class HpSpace:
    """A search space defined by users' own model code (module docstring)."""

    conditional = True

    def __init__(
        self,
        build: Callable[..., Any],
        fit: Callable[..., Any] | None = None,
        overrides: Overrides | None = None,
        label: str = "build_model(hp)",
    ) -> None:
        if not callable(build):
            raise SpaceError(f"build_model must be a function of hp, got {type(build).__name__}.")
        self.build = build
        self.fit = fit
        self.overrides = overrides or Overrides()
        self.label = label
        if _trains(build):
            raise self._objective_error()
        self._dry = _DryRun()
        self._dry_build = self._dry.function(build)
        self._dry_fit = self._dry.function(fit) if fit is not None else None
        self._described: dict[str, str] | None = None
        #: what the HyperModel's fit returned when probed: ``value`` (one number: the
        #: objective, as KerasTuner reads it), ``history``, ``dict``, or None (not known)
        self.fit_returns: str | None = None
        self._names: list[str] = []
        self._grid: list[dict[str, Value]] | None = None

    # what the engines and the trial call -------------------------------------------------
    def builder(self, params: Mapping[str, Value]) -> Any:
        """Build the model for ``params`` by replaying them through the code (in a trial)."""
        hp = FixedHP(params, self.overrides)
        model = self.build(hp)
        self._check_missing(hp)
        return model

    def fit_trial(self, params: Mapping[str, Value], model: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the HyperModel's ``fit(hp, model, *args, **kwargs)`` with ``params`` (in a
        trial); ``hp`` answers every parameter ``build`` declared too."""
        assert self.fit is not None
        hp = FixedHP(params, self.overrides)
        hp.values.update(params)  # build's parameters, readable with hp.get in fit
        result = self.fit(hp, model, *args, **kwargs)
        self._check_missing(hp)
        return result

    def suggest(self, trial: Any) -> dict[str, Value]:
        """Sample through ``trial.suggest_*`` by declaring every parameter once."""
        hp = SuggestHP(trial, self.overrides)
        self._declare(hp, "to sample its hyperparameters")
        return _with_fixed(hp)

    def to_hp(self, hp: Any, grid: bool = False) -> dict[str, Value]:
        """Declare the parameters on keras-tuner's ``HyperParameters``; return active values.

        ``grid`` is accepted for symmetry with ``Space.to_hp``: the code's own declarations
        are what keras-tuner's grid enumerates."""
        self._declare(hp, "to declare its hyperparameters to keras-tuner")
        return {
            p.name: hp.values[p.name]
            for p in hp.space
            if not p.name.startswith("tuner/") and p.name in hp.values and hp.is_active(p)
        }

    def grid(self) -> list[dict[str, Value]]:
        """Every path through the code once (one dry call per point)."""
        if self._grid is not None:
            return list(self._grid)
        points: list[dict[str, Value]] = []
        path: list[int] = []
        while True:
            hp = _PathHP(path, self.overrides)
            self._declare(hp, "to enumerate its grid")
            points.append(_searched(hp))
            if len(points) > MAX_GRID:
                raise SpaceError(
                    f"{self.label} defines {self._size_text()} grid points, more than grid "
                    f"search enumerates ({MAX_GRID:,}). Narrow the ranges (step=, fewer "
                    "choices, fewer layers) or use --strategy random or bayesian."
                )
            index = list(path[: len(hp.sizes)]) + [0] * (len(hp.sizes) - len(path))
            j = len(index) - 1
            while j >= 0 and index[j] + 1 >= hp.sizes[j]:
                j -= 1
            if j < 0:
                break
            path = index[:j] + [index[j] + 1]
        self._grid = points
        return list(points)

    def grid_size(self) -> int:
        return len(self.grid())

    def defaults(self) -> dict[str, Value]:
        """The default point: an empty params dict, which ``builder`` replays with every
        parameter's default."""
        return {}

    @property
    def names(self) -> list[str]:
        """The names of the parameters the code's default path declares (and searches)."""
        self.describe()
        return list(self._names)

    def describe(self) -> dict[str, str]:
        """The code's name and the parameters its default path declares."""
        if self._described is None:
            hp = HP(self.overrides)
            self._declare(hp, "to read its hyperparameters")
            owner = getattr(self.build, "__self__", None)
            key, target = (
                ("hypermodel", type(owner)) if owner is not None else ("build_model", self.build)
            )
            name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
            self._names = list(hp.declared)
            self._described = {
                key: name.replace("searchlab_study_", "", 1),
                **{k: p.describe() for k, p in hp.declared.items()},
                **self.overrides.describe(),
            }
        return dict(self._described)

    # internals ---------------------------------------------------------------------------
    def _declare(self, hp: Any, purpose: str) -> None:
        """Run the code once with ``hp``, outside a trial: dry where it can be (no model is
        built), for real where it cannot; every failure is one line."""
        self._run(self.build, self._dry_build, hp, purpose, "build")
        if self.fit is not None:
            self._probe_fit(hp, purpose)

    def _run(
        self,
        real: Callable[..., Any],
        dry: Callable[..., Any] | None,
        hp: Any,
        purpose: str,
        what: str,
    ) -> None:
        if dry is not None:
            snapshot = _snapshot(hp)
            calls = len(self._dry.calls)
            try:
                result = dry(hp)
            except _Unsure as exc:
                log.info(
                    "%s decides its structure from a Keras value (%s): it is called for real "
                    "to read its hyperparameters, which builds a model each time",
                    self.label,
                    exc,
                )
                _restore(hp, snapshot)
            except SearchlabError:
                raise
            except Exception as exc:  # stand-ins met real code: call it for real instead
                log.info("%s cannot be dry-run (%s): it is called for real", self.label, exc)
                _restore(hp, snapshot)
            else:
                trains = any(c.rsplit(".", 1)[-1] in _TRAINING for c in self._dry.calls[calls:])
                del self._dry.calls[calls:]
                if trains:
                    raise self._objective_error()
                self._check_result(result, purpose)
                return
            if what == "build":
                self._dry_build = None  # not again: call it for real from now on
        try:
            result = real(hp)
        except SearchlabError:
            raise
        except Exception as exc:
            raise self._outside_error(real, exc, purpose) from None
        self._check_result(result, purpose)

    def _probe_fit(self, hp: Any, purpose: str) -> None:
        """Read the parameters ``HyperModel.fit`` declares: run it dry with stand-ins for the
        model and the data, up to its first use of them that decides something (or anything
        it raises there: a probe reads what it can, the trial runs ``fit`` for real).
        Parameters declared after that point are not searched (a trial warns of them)."""
        fit = self._dry_fit
        if fit is None:  # not plain Python code: not called outside a trial (it may print,
            return  # write files, train); what it declares is then not searched
        calls = self._dry.calls
        model, x, y = _Stub("model", calls), _Stub("x", calls), _Stub("y", calls)
        kwargs = {  # what a trial passes (``trial._user_fit``)
            "validation_data": (_Stub("x_val", calls), _Stub("y_val", calls)),
            "epochs": 1,
            "batch_size": 32,
            "callbacks": [],
            "verbose": 0,
        }
        try:
            self.fit_returns = _returns(fit(hp, model, x, y, **kwargs))
        except SearchlabError:
            raise
        except Exception as exc:  # (_Unsure too) as far as it got: in a trial it runs for real
            log.debug("probing %s's fit stopped at %r", self.label, exc)
        finally:
            del calls[:]

    def _check_result(self, result: Any, purpose: str) -> None:
        if isinstance(result, int | float) and not isinstance(result, bool):
            raise self._objective_error()

    def _objective_error(self) -> StudyDefinitionError:
        path, line = _where(self.build)
        return StudyDefinitionError(
            f"{path}, line {line}: {self.label} trains a model and returns a value, as an "
            f"Optuna objective(trial) does. {SPLIT_OBJECTIVE}."
        )

    def _outside_error(
        self, fn: Callable[..., Any], exc: Exception, purpose: str
    ) -> StudyDefinitionError:
        path, first = _where(fn)
        line = _line_of(exc, path, first)
        what = (str(exc).strip().splitlines() or [""])[0][:200]
        name = self.label if fn is self.build else f"{self.label}'s fit"
        return StudyDefinitionError(
            f"{path}, line {line}: {name} raised {type(exc).__name__}: {what} -- searchlab "
            f"calls it outside a trial, with default values and no data, {purpose}. Make it "
            "work there (declare every hyperparameter before it loads data or weights; offline, "
            "give weights that are on disk), or declare the space with space={...}."
        )

    def _check_missing(self, hp: FixedHP) -> None:
        """Warn about parameters the code declared in a trial that reading its space did not
        see (its structure changed between the two calls): they are not searched."""
        unseen = [n for n in hp.missing if n not in self.describe()]
        if unseen:
            log.warning(
                "%s declared %s in this trial but not when searchlab read its space: "
                "not searched, its default is used",
                self.label,
                ", ".join(repr(n) for n in unseen),
            )

    def _size_text(self) -> str:
        """The grid's size, counted without enumerating it (branches of one parameter that
        lead to the same parameters are counted once and multiplied)."""
        budget = [MAX_COUNT_CALLS]

        def run(path: list[int]) -> _PathHP:
            budget[0] -= 1
            if budget[0] < 0:
                raise _Unsure("too many calls")
            hp = _PathHP(path, self.overrides)
            self._declare(hp, "to count its grid points")
            return hp

        def count(path: list[int]) -> int:
            hp = run(path)
            depth = len(path)
            if depth >= len(hp.sizes):
                return 1
            seen: dict[tuple, int] = {}
            total = 0
            for value in range(hp.sizes[depth]):
                child = hp if value == 0 else run([*path, value])
                below = tuple(zip(child.names[depth + 1 :], child.sizes[depth + 1 :], strict=True))
                if below not in seen:
                    seen[below] = count([*path, value])
                total += seen[below]
            return total

        try:
            return f"{count([]):,}"
        except _Unsure:
            return f"more than {MAX_GRID:,}"


_TRAINING = frozenset({"fit", "evaluate", "train_on_batch", "fit_generator"})


def _searched(hp: HP) -> dict[str, Value]:
    """The values of the parameters searched (not those ``hyperparameters=`` fixed)."""
    return {name: hp.values[name] for name in hp.declared}


def _returns(result: Any) -> str | None:
    """What a dry ``HyperModel.fit`` returned, in kind: ``history`` (``model.fit``'s, or
    what it holds), ``dict``, ``value`` (a number, or a framework value not from ``fit`` or
    ``evaluate``: ``np.mean(abs(model.predict(x) - y))``), None where it cannot tell."""
    if isinstance(result, Mapping):
        return "dict"
    if isinstance(result, int | float) and not isinstance(result, bool):
        return "value"
    if isinstance(result, _Stub):
        path = object.__getattribute__(result, "_path")
        if "fit()" in path:
            return "history"
        return None if "evaluate()" in path else "value"
    if type(result).__module__ == "numpy" and getattr(result, "shape", None) == ():
        return "value"
    return None


def _with_fixed(hp: HP) -> dict[str, Value]:
    """The trial's params: the searched values, and those the code fixed (``hp.Fixed``,
    ``hyperparameters=``, ``tune_new_entries=False``), in the order the code declared them.
    Only the searched ones reach the sampler (``_searched``): the others are shown."""
    return {n: v for n, v in hp.values.items() if n in hp.declared or v is not None}


def _trains(fn: Callable[..., Any]) -> bool:
    """Whether a model function trains (calls ``.fit`` / ``.evaluate``) or reports to Optuna
    itself: an Optuna ``objective(trial)``, not a ``create_model(trial)``."""
    if inspect.ismethod(fn):
        return False  # a HyperModel's build: its training is its fit
    code = getattr(fn, "__code__", None)
    names = set(getattr(code, "co_names", ()))
    return bool(names & (_TRAINING | {"report", "should_prune"}))


def _snapshot(hp: Any) -> Any:
    if isinstance(hp, HP):
        return (
            dict(hp.values),
            dict(hp.declared),
            list(getattr(hp, "sizes", [])),
            list(getattr(hp, "names", [])),
        )
    return None


def _restore(hp: Any, snapshot: Any) -> None:
    """Forget what a dry run that gave up had declared, so the real call declares it again.
    (keras-tuner's ``HyperParameters`` keeps them: declaring again returns the same.)"""
    if snapshot is None or not isinstance(hp, HP):
        return
    values, declared, sizes, names = snapshot
    hp.values, hp.declared = values, declared
    hp._scopes = []
    if isinstance(hp, _PathHP):
        hp.sizes, hp.names = sizes, names
