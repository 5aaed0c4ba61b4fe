"""KerasTuner-style ``build_model(hp)``: the Optuna adapter, replay, grid enumeration, Study."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from searchlab import Choice, Int, Study
from searchlab.errors import SpaceError, StudyDefinitionError
from searchlab.hp import HP, FixedHP, HpSpace, SuggestHP


def build_model(hp):
    """Getting-started style, without Keras: returns what it read (the tests need no model)."""
    seen = {"layers": []}
    for i in range(hp.Int("num_layers", 1, 3)):
        seen["layers"].append(hp.Int(f"units_{i}", min_value=32, max_value=96, step=32))
    seen["activation"] = hp.Choice("activation", ["relu", "tanh"])
    if hp.Boolean("dropout"):
        with hp.conditional_scope("dropout", [True]):
            seen["rate"] = hp.Float("rate", 0.1, 0.3, step=0.1)
    seen["opt"] = hp.Choice("opt", ["adam", "sgd"])
    seen["momentum"] = hp.Float(
        "momentum", 0.0, 0.9, step=0.9, parent_name="opt", parent_values=["sgd"]
    )
    return seen


def _grid_count() -> int:
    n = 0
    for layers in (1, 2, 3):
        n += (
            3**layers * 2 * (1 + 3) * (1 + 2)
        )  # units^layers, activation, dropout(+rate), opt(+momentum)
    return n


def test_suggest_hp_turns_calls_into_optuna_suggestions_with_conditions():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_conditional = set()
    for _ in range(30):
        trial = study.ask()
        hp = SuggestHP(trial)
        out = build_model(hp)
        assert trial.params == hp.values
        assert len(out["layers"]) == hp.values["num_layers"]
        assert ("rate" in hp.values) == hp.values["dropout"]
        assert ("momentum" in hp.values) == (hp.values["opt"] == "sgd")
        assert out["momentum"] is None or hp.values["opt"] == "sgd"  # inactive reads as None
        seen_conditional |= {k for k in ("rate", "momentum") if k in hp.values}
        study.tell(trial, 0.0)
    assert seen_conditional == {"rate", "momentum"}
    dists = study.trials[0].distributions
    assert isinstance(dists["num_layers"], optuna.distributions.IntDistribution)
    assert isinstance(dists["activation"], optuna.distributions.CategoricalDistribution)
    assert isinstance(dists["dropout"], optuna.distributions.CategoricalDistribution)


def test_log_sampling_and_defaults():
    class Rec:
        def __init__(self):
            self.calls = {}

        def suggest_float(self, name, low, high, *, step=None, log=False):
            self.calls[name] = (low, high, step, log)
            return low

        def suggest_int(self, name, low, high, step=1, log=False):
            self.calls[name] = (low, high, step, log)
            return low

        def suggest_categorical(self, name, choices):
            return choices[0]

    rec = Rec()
    hp = SuggestHP(rec)
    hp.Float("lr", 1e-4, 1e-2, sampling="log")
    hp.Int("filters", 8, 64, sampling="log")
    assert rec.calls == {"lr": (1e-4, 1e-2, None, True), "filters": (8, 64, 1, True)}
    plain = HP()
    assert plain.Int("a", 2, 5) == 2 and plain.Float("b", 0.5, 1.0, default=0.7) == 0.7
    assert plain.Choice("c", ["x", "y"]) == "x" and plain.Boolean("d") is False
    with pytest.raises(SpaceError, match="sampling must be"):
        plain.Float("e", 0.1, 1.0, sampling="cubic")
    with pytest.raises(SpaceError, match="not declared before"):
        with plain.conditional_scope("nope", [1]):
            pass


def test_fixed_hp_replays_params_and_defaults_the_rest():
    out = build_model(
        FixedHP({"num_layers": 2, "units_0": 64, "units_1": 96, "dropout": True, "rate": 0.2})
    )
    assert out["layers"] == [64, 96] and out["rate"] == 0.2
    assert out["activation"] == "relu" and out["opt"] == "adam" and out["momentum"] is None


def test_grid_enumerates_every_path_once():
    space = HpSpace(build_model)
    points = space.grid()
    assert len(points) == _grid_count() == space.grid_size()
    keys = {tuple(sorted(p.items())) for p in points}
    assert len(keys) == len(points)
    assert {
        "num_layers": 1,
        "units_0": 32,
        "activation": "relu",
        "dropout": False,
        "opt": "adam",
    } in points
    assert all(("rate" in p) == p["dropout"] for p in points)
    assert all(len([k for k in p if k.startswith("units_")]) == p["num_layers"] for p in points)


def test_grid_refuses_a_continuous_float_with_the_fix():
    def continuous(hp):
        hp.Float("lr", 1e-4, 1e-2, sampling="log")

    with pytest.raises(SpaceError, match=r"hp.Float\('lr'.*step=.*hp.Choice.*--strategy random"):
        HpSpace(continuous).grid()


def test_study_accepts_build_model_hp(data_dir):
    study = Study(name="kt-style", space=None, model=build_model, data="mnist")
    assert isinstance(study.search_space, HpSpace)
    assert study.model({"num_layers": 1, "units_0": 96})["layers"] == [96]
    again = dataclasses.replace(study, epochs=1)  # what --subset / --epochs do
    assert again.search_space is study.search_space and again.model == study.model
    described = study.search_space.describe()
    assert described["build_model"].endswith("build_model")
    assert described["num_layers"] == "int [1, 3]"


def test_space_to_hp_declares_conditions_for_keras_tuner():
    kt = pytest.importorskip("keras_tuner")
    from searchlab.space import Space

    space = Space({"layers": Int(1, 2), "width": Choice([8, 16], when={"layers": 2})}).validate()
    hp = kt.HyperParameters()
    assert space.to_hp(hp) == {"layers": 1}
    width = [p for p in hp.space if p.name == "width"][0]
    assert width.conditions and width.conditions[0].name == "layers"
    hp.values["layers"] = 2
    hp.ensure_active_values()  # what keras-tuner's oracle does for a trial's values
    values = space.to_hp(hp)
    assert set(values) == {"layers", "width"} and values["width"] in (8, 16)


def test_pruner_option_maps_to_optuna_pruners_and_none_really_means_none():
    from searchlab.engines import RunOptions
    from searchlab.engines.optuna import make_pruner

    def pruner(name, strategy="bayesian"):
        options = RunOptions(
            strategy=strategy,
            trials=1,
            timeout=None,
            epochs=4,
            seed=0,
            storage="sqlite://",
            pruner=name,
        )
        return type(make_pruner(options)).__name__

    assert pruner("none") == "NopPruner"
    assert pruner("median") == "MedianPruner"
    assert pruner("asha") == "SuccessiveHalvingPruner"
    assert pruner("hyperband") == "HyperbandPruner"
    assert pruner("none", strategy="hyperband") == "HyperbandPruner"


def test_unknown_pruner_is_one_clear_error(data_dir):
    from searchlab import engines, runner

    study = Study(name="p", space={"a": Int(1, 2)}, model=lambda p: None, data="mnist")
    options = engines.RunOptions(
        strategy="random",
        trials=1,
        timeout=None,
        epochs=1,
        seed=0,
        storage="sqlite://",
        pruner="sometimes",
    )
    with pytest.raises(
        StudyDefinitionError, match="Unknown pruner 'sometimes': choose one of none"
    ):
        runner.run(study, options, tracker=None)


def test_pruner_settings_reach_the_optuna_pruners():
    from searchlab.engines import RunOptions
    from searchlab.engines.optuna import make_pruner, pruner_args

    def options(pruner, **kw):
        return RunOptions(
            strategy="bayesian",
            trials=1,
            timeout=None,
            epochs=10,
            seed=0,
            storage="sqlite://",
            pruner=pruner,
            **kw,
        )

    asha = make_pruner(options("asha"))
    assert (asha._min_resource, asha._reduction_factor, asha._bootstrap_count) == (1, 3, 0)
    asha = make_pruner(options("asha", prune_min_epochs=2, prune_factor=2))
    assert (asha._min_resource, asha._reduction_factor) == (2, 2)
    hyperband = make_pruner(options("hyperband", prune_min_epochs=2, prune_factor=4))
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (
        2,
        10,
        4,
    )
    assert make_pruner(options("median", prune_min_epochs=3))._n_warmup_steps == 3
    assert pruner_args(options("asha")) == "min_epochs=1, factor=3"
    assert pruner_args(options("none")) == ""


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"pruner": "none", "prune_factor": 2},
            "--prune-factor only apply with a pruner, and this run has none: add --pruner asha",
        ),
        (
            {"pruner": "median", "prune_factor": 2},
            "--prune-factor is the reduction factor of --pruner asha and hyperband",
        ),
        ({"pruner": "asha", "prune_factor": 1}, r"--prune-factor must be an integer >= 2 .* got 1"),
        (
            {"pruner": "asha", "prune_min_epochs": 0},
            "--prune-min-epochs must be an integer >= 1, but got 0",
        ),
        (
            {"pruner": "asha", "prune_min_epochs": 4},
            r"--prune-min-epochs must be less than the epochs per trial \(4\), but got 4",
        ),
    ],
)
def test_pruner_settings_that_cannot_work_are_one_clear_error(settings, message):
    from searchlab import engines, runner

    options = engines.RunOptions(
        strategy="bayesian",
        trials=1,
        timeout=None,
        epochs=4,
        seed=0,
        storage="sqlite://",
        **settings,
    )
    with pytest.raises(StudyDefinitionError, match=message):
        engines.check_pruning(options)
    study = Study(name="p", space={"a": Int(1, 2)}, model=lambda p: None, data="mnist")
    with pytest.raises(StudyDefinitionError, match=message):  # before any store is touched
        runner.run(study, options, tracker=None)


def test_prune_settings_on_the_command_line_are_checked_before_training(cli, project):
    study_file = project / "s.py"
    study_file.write_text(
        "from searchlab import Dataset, Int, Study\n"
        "study = Study(name='s', space={'a': Int(1, 2)}, model=lambda p: None,\n"
        "              data=Dataset('mnist', subset={'train': 64, 'val': 32}), epochs=2, trials=1)\n"
    )
    result = cli("run", study_file, "--pruner", "asha", "--prune-min-epochs", "2")
    assert result.exit_code != 0
    assert (
        "--prune-min-epochs must be less than the epochs per trial (2), but got 2" in result.output
    )


def test_reeval_choice_is_by_mean_not_by_the_lucky_single():
    from searchlab.reeval import choose

    results = {
        "3": {"mean": 0.80, "std": 0.10, "values": [0.70, 0.90]},  # the lucky 0.95 in search
        "5": {"mean": 0.86, "std": 0.01, "values": [0.85, 0.87]},
        "7": {"mean": None, "values": []},  # every re-run failed: never chosen
    }
    assert choose(results, "maximize") == "5"
    assert choose(results, "minimize") == "3"
    assert choose({}, "maximize") is None


def test_the_shipped_kerastuner_style_study_loads(data_dir):
    from searchlab.study import load_study

    study = load_study(Path(__file__).resolve().parent.parent / "studies" / "mnist_hp.py")
    assert isinstance(study.search_space, HpSpace)
    described = study.search_space.describe()
    assert {"num_layers", "units_0", "activation", "dropout", "lr"} <= set(described)
