"""Space validation, grid enumeration and sampling (no training)."""

from __future__ import annotations

import itertools

import optuna
import pytest

from searchlab import Bool, Choice, Float, Int, Space, SpaceError
from searchlab.space import as_space


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"a": Int(5, 1)}, "low <= high must hold, but got (low=5, high=1)"),
        ({"a": Float(0.5, 0.1)}, "low <= high must hold"),
        ({"a": Float(0.0, 1.0, log=True)}, "log scale needs low > 0, but got low=0.0"),
        ({"a": Int(0, 8, log=True)}, "log scale needs low > 0"),
        ({"a": Choice([])}, "has no values"),
        ({"a": Choice("abc")}, "values must be a list"),
        ({"a": Choice([1, 1])}, "lists a value twice"),
        ({"a": Choice([[1, 2]])}, "values must be str, int, float, bool or None"),
        ({"a": Int(1, 5, step=0)}, "step must be > 0"),
        ({"a": Int(1.5, 5)}, "low must be an int"),
        ({"a": Float(1e-4, 1e-2, grid=[1.0])}, "grid values must lie in [low, high]"),
        ({"a": 3}, "must be Int, Float, Choice or Bool"),
        ({"b": Int(1, 2, when={"a": 1}), "a": Int(1, 2)}, "'a' is not declared before it"),
        ({"a": Int(1, 2), "b": Int(1, 2, when={"a": 7})}, "can never happen"),
        ({"not valid": Int(1, 2)}, "must be identifiers"),
    ],
)
def test_impossible_spaces_are_refused_with_the_constraint(space: dict, message: str) -> None:
    with pytest.raises(SpaceError) as info:
        as_space(space)
    assert message in str(info.value)


def test_a_space_that_is_not_a_dict_is_refused() -> None:
    with pytest.raises(SpaceError, match="must be a dict"):
        as_space([Int(1, 2)])  # type: ignore[arg-type]


def test_grid_enumerates_every_combination_once() -> None:
    space = as_space(
        {
            "layers": Int(1, 3),
            "units": Choice([64, 128]),
            "lr": Float(1e-4, 1e-2, log=True, grid=[1e-4, 1e-3]),
            "bn": Bool(),
        }
    )
    grid = space.grid()
    assert len(grid) == 3 * 2 * 2 * 2 == space.grid_size()
    every = itertools.product([1, 2, 3], [64, 128], [1e-4, 1e-3], [False, True])
    expected = {(("bn", bn), ("layers", n), ("lr", lr), ("units", u)) for n, u, lr, bn in every}
    assert {tuple(sorted(p.items())) for p in grid} == expected  # each combination, no other
    assert grid[0] == {"layers": 1, "units": 64, "lr": 1e-4, "bn": False}


def test_grid_of_a_float_with_a_step() -> None:
    assert as_space({"d": Float(0.0, 0.5, step=0.25)}).grid() == [
        {"d": 0.0},
        {"d": 0.25},
        {"d": 0.5},
    ]


def test_grid_refuses_a_continuous_parameter_and_says_how_to_fix_it() -> None:
    space = as_space({"lr": Float(1e-4, 1e-2, log=True)})
    with pytest.raises(SpaceError) as info:
        space.grid()
    text = str(info.value)
    assert "'lr' is continuous and has no grid values" in text
    assert "grid=[" in text and "--strategy random" in text


def test_conditional_parameters_are_left_out_of_inactive_grid_points() -> None:
    space = as_space(
        {
            "layers": Int(1, 2),
            "units_2": Choice([32, 64], when={"layers": 2}),
        }
    )
    assert space.grid() == [
        {"layers": 1},
        {"layers": 2, "units_2": 32},
        {"layers": 2, "units_2": 64},
    ]


def test_suggest_samples_inside_the_space_through_optuna() -> None:
    space = as_space(
        {
            "layers": Int(1, 3),
            "lr": Float(1e-4, 1e-2, log=True),
            "act": Choice(["relu", "gelu"]),
            "extra": Int(8, 16, when={"layers": [2, 3]}),
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen: dict[str, set] = {"layers": set(), "act": set(), "extra": set()}
    for _ in range(40):
        trial = study.ask()
        params = space.suggest(trial)
        assert params == trial.params  # what Optuna recorded is what the trial gets
        assert 1 <= params["layers"] <= 3
        assert 1e-4 <= params["lr"] <= 1e-2
        assert params["act"] in ("relu", "gelu")
        assert ("extra" in params) == (params["layers"] >= 2)
        for name in seen:
            if name in params:
                seen[name].add(params[name])
        study.tell(trial, 0.0)
    assert seen["layers"] == {1, 2, 3} and seen["act"] == {"relu", "gelu"}  # it samples
    assert len(seen["extra"]) > 1
    dists = next(t for t in study.trials if "extra" in t.params).distributions
    assert dists["layers"] == optuna.distributions.IntDistribution(1, 3)
    assert dists["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["act"] == optuna.distributions.CategoricalDistribution(["relu", "gelu"])
    assert dists["extra"] == optuna.distributions.IntDistribution(8, 16)


def test_space_is_a_mapping_and_describes_itself() -> None:
    space = Space({"a": Int(1, 4), "b": Float(0.1, 1.0, log=True)})
    assert list(space) == ["a", "b"] and len(space) == 2
    assert space.describe() == {"a": "int [1, 4]", "b": "float [0.1, 1] log"}
