"""KerasTuner-style study files: ``build_model(hp)`` on any engine.

A study may give ``model=build_model`` and ``space=None``, where ``build_model(hp)`` declares
its parameters while it builds, exactly as KerasTuner code does (``hp.Int``, ``hp.Float``,
``hp.Choice``, ``hp.Boolean``, ``hp.Fixed``, ``hp.conditional_scope`` and the
``parent_name=`` / ``parent_values=`` arguments).  ``HpSpace`` wraps such a function so the
engines treat it like a declarative ``Space``:

* ``suggest(trial)``: calls the function once with an ``hp`` whose every call becomes Optuna's
  ``trial.suggest_*`` (define-by-run, so conditional parameters follow naturally), and returns
  the params dict that was sampled;
* ``to_hp(hp)``: calls the function with keras-tuner's own ``HyperParameters``;
* ``grid()``: enumerates every path through the function (one call per grid point), or
  refuses a continuous ``hp.Float`` with one line naming the fix;
* ``builder``: ``builder(params)`` rebuilds the model from a params dict by replaying it, so
  trials, re-evaluation and export use the same params-dict code path as any study.

Inactive parameters read as ``None`` (KerasTuner's rule).  Nothing here imports Optuna,
keras-tuner or Keras.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from searchlab.errors import SpaceError
from searchlab.space import Bool, Choice, Float, Int, Param, Value

#: The most grid points a ``build_model(hp)`` study may enumerate.
MAX_GRID = 5000


class _Condition:
    def __init__(self, parent: str, values: Sequence[Value]) -> None:
        self.parent = parent
        self.values = tuple(values) if isinstance(values, list | tuple | set) else (values,)


class HP:
    """The ``hp`` object a ``build_model(hp)`` function receives (KerasTuner's API).

    Subclasses decide how a value is picked (``_pick``); this class keeps the values, the
    conditions and the declared parameters.
    """

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}
        self.params: dict[str, Param] = {}
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
        with self._maybe_scope(parent_name, parent_values):
            return value if self._active() else None

    @contextlib.contextmanager
    def conditional_scope(self, parent_name: str, parent_values: Any) -> Iterator[None]:
        """Parameters declared inside are active only when ``parent_name`` is in ``parent_values``."""
        if parent_name not in self.params:
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
            if name in self.values:  # declared twice (e.g. in a loop): the first value holds
                return self.values[name]
            param.check(name)
            value = self._pick(name, param, default)
            self.params[name] = param
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

    def __init__(self, trial: Any) -> None:
        super().__init__()
        self.trial = trial

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        return param.suggest(name, self.trial)


class FixedHP(HP):
    """Replays a params dict; a parameter missing from it takes its default."""

    def __init__(self, params: Mapping[str, Value]) -> None:
        super().__init__()
        self.fixed = dict(params)

    def _pick(self, name: str, param: Param, default: Value) -> Value:
        return self.fixed.get(name, default)


class _PathHP(HP):
    """Picks the ``path[i]``-th grid value for the i-th parameter met (0 past the path)."""

    def __init__(self, path: Sequence[int]) -> None:
        super().__init__()
        self.path = list(path)
        self.sizes: list[int] = []

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
        return options[index]


class HpSpace:
    """A search space defined by a KerasTuner-style ``build_model(hp)`` function."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        if not callable(build):
            raise SpaceError(f"build_model must be a function of hp, got {type(build).__name__}.")
        self.build = build
        self._described: dict[str, str] | None = None
        self._grid: list[dict[str, Value]] | None = None

    conditional = True

    def builder(self, params: Mapping[str, Value]) -> Any:
        """Build the model for ``params`` by replaying them through ``build_model``."""
        return self.build(FixedHP(params))

    def suggest(self, trial: Any) -> dict[str, Value]:
        """Sample through ``trial.suggest_*`` by calling ``build_model`` once."""
        hp = SuggestHP(trial)
        self.build(hp)
        return dict(hp.values)

    def to_hp(self, hp: Any, grid: bool = False) -> dict[str, Value]:
        """Call ``build_model`` with keras-tuner's ``HyperParameters``; return active values.

        ``grid`` is accepted for symmetry with ``Space.to_hp``: the function's own
        declarations are what keras-tuner's grid enumerates."""
        self.build(hp)
        return {
            p.name: hp.values[p.name]
            for p in hp.space
            if not p.name.startswith("tuner/") and p.name in hp.values and hp.is_active(p)
        }

    def grid(self) -> list[dict[str, Value]]:
        """Every path through ``build_model`` once (one call per point)."""
        if self._grid is not None:
            return list(self._grid)
        points: list[dict[str, Value]] = []
        path: list[int] = []
        while True:
            hp = _PathHP(path)
            self.build(hp)
            points.append(dict(hp.values))
            if len(points) > MAX_GRID:
                raise SpaceError(
                    f"build_model(hp) defines more than {MAX_GRID} grid points. Narrow the "
                    "ranges (step=, fewer choices) or use --strategy random."
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

    @property
    def names(self) -> list[str]:
        """The names of the parameters ``build_model``'s default path declares."""
        return [k for k in self.describe() if k != "build_model"]

    def describe(self) -> dict[str, str]:
        """The function's name and the parameters its default path declares."""
        if self._described is None:
            hp = HP()
            self.build(hp)
            name = f"{getattr(self.build, '__module__', '?')}.{getattr(self.build, '__qualname__', '?')}"
            self._described = {
                "build_model": name.replace("searchlab_study_", "", 1),
                **{k: p.describe() for k, p in hp.params.items()},
            }
        return dict(self._described)
