"""Declarative search spaces: ``Int``, ``Float``, ``Choice``, ``Bool`` and ``Space``.

A space is a mapping from parameter name to parameter.  It is validated before any training,
enumerated for grid search, sampled through any object with Optuna's ``suggest_*`` methods,
and translated to keras-tuner's ``hp``.  Nothing here imports Optuna or Keras.

Example:
    >>> space = Space({
    ...     "layers": Int(1, 3),
    ...     "units": Choice([64, 128]),
    ...     "lr": Float(1e-4, 1e-2, log=True, grid=[1e-4, 1e-3, 1e-2]),
    ...     "dropout": Float(0.0, 0.5, when={"layers": [2, 3]}),
    ... })
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from searchlab.errors import SpaceError

Value = bool | int | float | str | None
#: The most grid points an ``Int`` without explicit ``grid=`` may enumerate.
MAX_INT_GRID = 1000


def _when(when: Mapping[str, Any] | None) -> dict[str, tuple[Value, ...]]:
    if not when:
        return {}
    out: dict[str, tuple[Value, ...]] = {}
    for parent, values in when.items():
        if isinstance(values, list | tuple | set | frozenset):
            out[parent] = tuple(values)
        else:
            out[parent] = (values,)
    return out


@dataclass(frozen=True)
class Int:
    """An integer in ``[low, high]`` (both included), optionally on a log scale or a step."""

    low: int
    high: int
    step: int = 1
    log: bool = False
    grid: Sequence[int] | None = None
    when: Mapping[str, Any] | None = None

    def check(self, name: str) -> None:
        for label, v in (("low", self.low), ("high", self.high), ("step", self.step)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpaceError(f"Int '{name}': {label} must be an int, but got {v!r}.")
        if self.low > self.high:
            raise SpaceError(
                f"Int '{name}': low <= high must hold, but got (low={self.low}, "
                f"high={self.high}). Swap the bounds."
            )
        if self.step <= 0:
            raise SpaceError(f"Int '{name}': step must be > 0, but got step={self.step}.")
        if self.log and self.low <= 0:
            raise SpaceError(
                f"Int '{name}': a log scale needs low > 0, but got low={self.low}. "
                "Raise low or drop log=True."
            )
        if self.log and self.step != 1:
            raise SpaceError(f"Int '{name}': log=True cannot be combined with step={self.step}.")
        _check_grid(name, self.grid, self.low, self.high)

    def grid_values(self, name: str) -> list[Value]:
        if self.grid is not None:
            return list(self.grid)
        count = (self.high - self.low) // self.step + 1
        if count > MAX_INT_GRID:
            raise SpaceError(
                f"Int '{name}' spans {count} values, too many for grid search (limit "
                f"{MAX_INT_GRID}). Give the points to try, e.g. Int({self.low}, {self.high}, "
                f"grid=[...]), or use --strategy random."
            )
        return list(range(self.low, self.high + 1, self.step))

    def suggest(self, name: str, trial: Any) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high

    def describe(self) -> str:
        return (
            f"int [{self.low}, {self.high}]"
            + (" log" if self.log else "")
            + (f" step {self.step}" if self.step != 1 else "")
        )


@dataclass(frozen=True)
class Float:
    """A float in ``[low, high]``; ``log=True`` samples on a log scale.

    Grid search needs the points to try: give ``grid=[...]`` or a ``step``.
    """

    low: float
    high: float
    log: bool = False
    step: float | None = None
    grid: Sequence[float] | None = None
    when: Mapping[str, Any] | None = None

    def check(self, name: str) -> None:
        for label, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise SpaceError(f"Float '{name}': {label} must be a finite number, got {v!r}.")
        if self.low > self.high:
            raise SpaceError(
                f"Float '{name}': low <= high must hold, but got (low={self.low}, "
                f"high={self.high}). Swap the bounds."
            )
        if self.log and self.low <= 0:
            raise SpaceError(
                f"Float '{name}': a log scale needs low > 0, but got low={self.low}. "
                "Use a small positive low such as 1e-5, or drop log=True."
            )
        if self.step is not None:
            if self.step <= 0:
                raise SpaceError(f"Float '{name}': step must be > 0, but got step={self.step}.")
            if self.log:
                raise SpaceError(f"Float '{name}': log=True cannot be combined with a step.")
        _check_grid(name, self.grid, self.low, self.high)

    def grid_values(self, name: str) -> list[Value]:
        if self.grid is not None:
            return [float(v) for v in self.grid]
        if self.step is not None:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        example = (
            f"Float({self.low}, {self.high}"
            + (", log=True" if self.log else "")
            + f", grid=[{self.low}, {self.high}])"
        )
        raise SpaceError(
            f"Float '{name}' is continuous and has no grid values, so grid search cannot "
            f"enumerate it. Give the points to try, e.g. {example}, or use --strategy random."
        )

    def suggest(self, name: str, trial: Any) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"float [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class Choice:
    """One of a fixed list of values (str, int, float, bool or None)."""

    values: Sequence[Value]
    when: Mapping[str, Any] | None = None

    def check(self, name: str) -> None:
        if isinstance(self.values, str) or not isinstance(self.values, Sequence):
            raise SpaceError(
                f"Choice '{name}': values must be a list, but got {self.values!r}. "
                f"Write Choice([{self.values!r}, ...])."
            )
        if len(self.values) == 0:
            raise SpaceError(f"Choice '{name}' has no values: give at least one.")
        for v in self.values:
            if v is not None and not isinstance(v, bool | int | float | str):
                raise SpaceError(
                    f"Choice '{name}': values must be str, int, float, bool or None so they "
                    f"can be stored, but got {v!r} ({type(v).__name__})."
                )
        if len(set(map(repr, self.values))) != len(self.values):
            raise SpaceError(f"Choice '{name}' lists a value twice: {list(self.values)!r}.")

    def grid_values(self, name: str) -> list[Value]:
        return list(self.values)

    def suggest(self, name: str, trial: Any) -> Value:
        return trial.suggest_categorical(name, list(self.values))

    def contains(self, value: Any) -> bool:
        return value in list(self.values)

    def describe(self) -> str:
        return "choice " + ", ".join(map(repr, self.values))


@dataclass(frozen=True)
class Bool:
    """``True`` or ``False``."""

    when: Mapping[str, Any] | None = None

    def check(self, name: str) -> None:
        return None

    def grid_values(self, name: str) -> list[Value]:
        return [False, True]

    def suggest(self, name: str, trial: Any) -> bool:
        return bool(trial.suggest_categorical(name, [False, True]))

    def contains(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "bool"


Param = Int | Float | Choice | Bool


def _check_grid(name: str, grid: Any, low: float, high: float) -> None:  # user input
    if grid is None:
        return
    if isinstance(grid, str) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise SpaceError(f"'{name}': grid must be a non-empty list of values, got {grid!r}.")
    outside = [v for v in grid if not (low <= v <= high)]
    if outside:
        raise SpaceError(
            f"'{name}': grid values must lie in [low, high] = [{low}, {high}], "
            f"but {outside!r} do not."
        )


@dataclass(frozen=True)
class Space(Mapping[str, Param]):
    """An ordered mapping name -> parameter. Conditions (``when=``) name earlier parameters."""

    params: Mapping[str, Param] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(self.params))

    def __getitem__(self, key: str) -> Param:
        return self.params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def validate(self) -> Space:
        """Check every parameter and condition; raise ``SpaceError`` naming the first problem."""
        seen: list[str] = []
        for name, param in self.params.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise SpaceError(f"Parameter names must be identifiers, but got {name!r}.")
            if not isinstance(param, Int | Float | Choice | Bool):
                raise SpaceError(
                    f"Parameter '{name}' must be Int, Float, Choice or Bool, but got "
                    f"{param!r}. Import them with `from searchlab import Int, Float, Choice, Bool`."
                )
            param.check(name)
            for parent, values in _when(param.when).items():
                if parent not in seen:
                    raise SpaceError(
                        f"Parameter '{name}' has when={{'{parent}': ...}}, but '{parent}' is not "
                        f"declared before it. Declare '{parent}' first."
                    )
                bad = [v for v in values if not self.params[parent].contains(v)]
                if bad:
                    raise SpaceError(
                        f"Parameter '{name}': when '{parent}' is {bad!r} can never happen; "
                        f"'{parent}' is {self.params[parent].describe()}."
                    )
            seen.append(name)
        return self

    def active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether parameter ``name`` is active given the values already chosen."""
        return all(
            parent in params and params[parent] in values
            for parent, values in _when(self.params[name].when).items()
        )

    @property
    def conditional(self) -> bool:
        return any(p.when for p in self.params.values())

    def suggest(self, trial: Any) -> dict[str, Value]:
        """Sample every active parameter through ``trial.suggest_*`` (Optuna's define-by-run)."""
        out: dict[str, Value] = {}
        for name, param in self.params.items():
            if self.active(name, out):
                out[name] = param.suggest(name, trial)
        return out

    def grid(self) -> list[dict[str, Value]]:
        """Every combination of grid values once; inactive parameters are left out."""
        names = list(self.params)
        values = [self.params[n].grid_values(n) for n in names]
        points: list[dict[str, Value]] = []
        seen: set[tuple] = set()
        for combo in itertools.product(*values):
            point: dict[str, Value] = {}
            for name, value in zip(names, combo, strict=True):
                if self.active(name, point):
                    point[name] = value
            key = tuple(sorted(point.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points

    def grid_size(self) -> int:
        return len(self.grid())

    def defaults(self) -> dict[str, Value]:
        """One point of the space: each active parameter's first grid value (or its low end,
        or its first choice); what ``trial.preflight`` builds before a search."""
        out: dict[str, Value] = {}
        for name, param in self.params.items():
            if not self.active(name, out):
                continue
            if isinstance(param, Int | Float):
                out[name] = param.grid[0] if param.grid is not None else param.low
            elif isinstance(param, Choice):
                out[name] = param.values[0]
            else:
                out[name] = False
        return out

    def to_hp(self, hp: Any, grid: bool = False) -> dict[str, Value]:
        """Declare and read every active parameter on a keras-tuner ``HyperParameters``.

        ``grid=True`` declares a parameter's ``grid=`` values as ``hp.Choice`` (what grid
        search enumerates); otherwise its full range.  A ``when=`` condition becomes ``hp.conditional_scope`` so keras-tuner's oracles know
        the parameter is conditional (and grid search enumerates it only where it is active).
        """
        out: dict[str, Value] = {}
        for name, param in self.params.items():
            with contextlib.ExitStack() as scopes:
                for parent, values in _when(param.when).items():
                    scopes.enter_context(hp.conditional_scope(parent, list(values)))
                value = hp_value(hp, name, param, grid)
            if self.active(name, out):
                out[name] = value
        return out

    def describe(self) -> dict[str, str]:
        return {name: p.describe() for name, p in self.params.items()}

    @property
    def names(self) -> list[str]:
        """The parameters' names, in declaration order."""
        return list(self.params)


def hp_value(hp: Any, name: str, param: Param, grid: bool = True) -> Value:
    if isinstance(param, Int):
        if param.grid is not None and grid:
            return hp.Choice(name, list(param.grid))
        return hp.Int(
            name, param.low, param.high, step=param.step, sampling="log" if param.log else "linear"
        )
    if isinstance(param, Float):
        if param.grid is not None and grid:
            return hp.Choice(name, [float(v) for v in param.grid])
        return hp.Float(
            name, param.low, param.high, step=param.step, sampling="log" if param.log else "linear"
        )
    if isinstance(param, Choice):
        return hp.Choice(name, list(param.values))
    return hp.Boolean(name)


def as_space(space: Space | Mapping[str, Param]) -> Space:
    """Accept a ``Space`` or a plain dict and return a validated ``Space``."""
    if isinstance(space, Space):
        return space.validate()
    if not isinstance(space, Mapping):
        raise SpaceError(
            f"space must be a dict of name -> Int/Float/Choice/Bool, but got {type(space).__name__}."
        )
    return Space(space).validate()
