"""The public names: ``__all__`` is exactly what we mean to export (httpx's
``test_exported_members.py``).  Adding or removing a public name is a decision: make it here."""

from __future__ import annotations
import __future__

import types

import pytest

import searchlab
import searchlab.models

EXPECTED = {
    searchlab: {
        "Bool",
        "Choice",
        "DataError",
        "Dataset",
        "Float",
        "Int",
        "SearchlabError",
        "Space",
        "SpaceError",
        "StoreError",
        "Study",
        "StudyDefinitionError",
        "TrialFailed",
        "best",
        "load_study",
        "results",
        "run",
        "setting",
    },
    searchlab.models: {"BACKBONES", "FineTune", "Transfer", "dense_classifier"},
}
MODULES = pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)


@MODULES
def test_all_is_the_expected_set_once(module: types.ModuleType) -> None:
    assert set(module.__all__) == EXPECTED[module]
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"


@MODULES
def test_every_name_in_all_is_importable(module: types.ModuleType) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)  # AttributeError for a missing name
    assert EXPECTED[module] <= set(namespace)
    for name in module.__all__:
        assert getattr(module, name) is namespace[name]


@MODULES
def test_every_public_top_level_name_is_in_all(module: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)  # a submodule, once anything imported it
        and value is not __future__.annotations  # `from __future__ import annotations`
    }
    assert public - set(module.__all__) == set(), "public but not exported: add to __all__ or _name"
