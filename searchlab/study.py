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

import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchlab.data import Dataset
from searchlab.errors import DataError, SearchlabError, StudyDefinitionError
from searchlab.hp import HpSpace
from searchlab.space import Param, Space, as_space

STRATEGIES = ("grid", "random", "bayesian", "gp", "hyperband")
DIRECTIONS = ("maximize", "minimize")


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
            when ``model`` is a KerasTuner-style ``build_model(hp)`` that declares its own
            parameters (``hp.Int``, ``hp.Float``, ``hp.Choice``, ``hp.Boolean``; see
            ``searchlab.hp``).
        model: ``build(params)`` or ``build(params, info)`` returning a compiled
            ``keras.Model``; ``info`` has ``input_shape`` and ``num_classes``.  With
            ``space=None``: ``build_model(hp)``.
        data: a dataset name (``"mnist"``) or a ``Dataset``.
        objective: the metric to optimise, as Keras reports it per epoch.
        direction: ``"maximize"`` or ``"minimize"``.
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
    """

    name: str
    space: Mapping[str, Param] | None
    model: Callable[..., Any]
    data: str | Dataset
    objective: str = "val_accuracy"
    direction: str = "maximize"
    strategy: str = "bayesian"
    trials: int | None = 20
    timeout: float | None = None
    epochs: int = 5
    seed: int = 0
    batch_size: int = 32
    tags: Mapping[str, str] = field(default_factory=dict)
    register: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise StudyDefinitionError(f"Study name must be a non-empty string, got {self.name!r}.")
        if not callable(self.model):
            raise StudyDefinitionError(
                f"Study model must be a function build(params) -> compiled keras.Model, "
                f"got {type(self.model).__name__}."
            )
        if self.space is None or isinstance(self.space, HpSpace):
            # build_model(hp): the function is the space; trials rebuild from a params dict
            hp_space = self.space or HpSpace(self.model)
            object.__setattr__(self, "space", hp_space)
            object.__setattr__(self, "model", hp_space.builder)
        else:
            object.__setattr__(self, "space", as_space(self.space))
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
        if self.direction not in DIRECTIONS:
            raise StudyDefinitionError(
                f"direction must be 'maximize' or 'minimize', got {self.direction!r}."
            )
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

    @property
    def dataset(self) -> Dataset:
        assert isinstance(self.data, Dataset)
        return self.data

    @property
    def search_space(self) -> Space | HpSpace:
        assert isinstance(self.space, Space | HpSpace)
        return self.space


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
    source = path.read_text(encoding="utf-8")
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
        exec(code, module.__dict__)  # noqa: S102 - a study file is the user's own code
    except SearchlabError as exc:
        raise type(exc)(f"{path}, line {_line_in(exc, path)}: {exc}") from None
    except Exception as exc:
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
