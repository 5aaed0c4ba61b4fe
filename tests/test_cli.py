"""``searchlab run``'s wiring, without training: the options a launcher hands its workers,
the environment variables behind the flags, the choices the flags accept."""

from __future__ import annotations

import dataclasses
import json

import pytest

from searchlab.engines import RunOptions

# Every field differs from its default, so a field the JSON drops or mangles shows.
EVERY_FIELD = RunOptions(
    strategy="gp", trials=7, timeout=12.5, epochs=9, seed=42,
    storage="postgresql://u:secret@db/s", data_dir="/data", engine="keras-tuner",
    max_failures=2, precision="mixed_bfloat16", pruner="asha", prune_min_epochs=2,
    prune_factor=4, reeval_top=3, reeval_seeds=5, parent_run_id="abc123", worker="2/3",
    recycle_mb=64.0,
)


def test_run_options_round_trip_every_field() -> None:
    defaults = RunOptions(strategy="random", trials=None, timeout=None, epochs=1, seed=0,
                          storage="sqlite:///x.db")
    for field in dataclasses.fields(RunOptions):  # a new field must be added above too
        assert getattr(EVERY_FIELD, field.name) != getattr(defaults, field.name), field.name
    back = RunOptions.from_json(EVERY_FIELD.to_json())
    assert back == EVERY_FIELD
    for field in dataclasses.fields(RunOptions):
        assert type(getattr(back, field.name)) is type(getattr(EVERY_FIELD, field.name))
    assert RunOptions.from_json(defaults.to_json()) == defaults  # the Nones too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must be an object"),
        (json.dumps({**json.loads(EVERY_FIELD.to_json()), "colour": "red"}), "no field colour"),
        (json.dumps({"strategy": "gp"}), "incomplete"),
        ("{not json", "Expecting"),
    ],
)
def test_run_options_from_json_refuses_anything_else(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunOptions.from_json(text)
