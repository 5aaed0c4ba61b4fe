"""What the MLflow UI shows of a trial: params with the digits a user writes
(``tracking.param_text``) and run names that match the console."""

from __future__ import annotations

import math

import pytest

from searchlab.tracking import param_text, session_run_name, trial_run_name


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.001, "0.001"),  # as written in a Choice or grid=
        (1e-4, "0.0001"),
        (0.5, "0.5"),
        (1.0, "1.0"),
        (123456.789, "123456.789"),
        (0.1 + 0.2, "0.3"),  # a step grid's arithmetic noise
        (math.exp(math.log(1e-3)), "0.001"),  # a log scale's
        (0.1 * 3, "0.3"),
        (0.002345678901234568, "0.00234568"),  # sampled from a range: 6 digits
        (3, "3"),
        (True, "True"),
        ("relu", "relu"),
        (None, "None"),
        (float("nan"), "nan"),
        (0.0, "0.0"),
    ],
)
def test_params_keep_the_digits_a_user_writes(value: object, text: str) -> None:
    assert param_text(value) == text


def test_a_written_value_reads_back_exactly() -> None:
    for value in (0.001, 3e-05, 0.25, 1.5e-7, 0.123456789012):
        assert float(param_text(value)) == value


def test_run_names_tell_sessions_apart_and_match_the_console() -> None:
    import time

    started = time.mktime((2026, 12, 8, 1, 40, 0, 0, 0, -1))
    assert session_run_name("cifar-vgg16", 3, started) == "cifar-vgg16 session 3 (2026-12-08 01:40)"
    assert trial_run_name(2, 3) == "trial 3 (#2)"  # the console's "trial 3 of 20 (#2)"
    assert trial_run_name(2) == "trial #2"
