"""The trials table: best first, whatever the trials' states."""

from __future__ import annotations

import pytest

from searchlab import table


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_table_of_failed_trials_only_is_sorted_by_number(direction: str) -> None:
    rows = [  # as StoredTrial.row gives them (a session whose every trial failed)
        {
            "number": n,
            "state": "failed",
            "value": None,
            "epochs": 0,
            "duration_s": 0.5,
            "run_id": f"run{n}",
            "params": {"units": 8 * (n + 1)},
        }
        for n in (1, 0)
    ]
    frame = table.trials_frame(rows, direction)
    assert list(frame["number"]) == [0, 1]


def test_complete_trials_come_first_in_the_studys_direction() -> None:
    rows = [
        {"number": 0, "state": "complete", "value": 0.3, "params": {}},
        {"number": 1, "state": "failed", "value": None, "params": {}},
        {"number": 2, "state": "complete", "value": 0.1, "params": {}},
    ]
    assert list(table.trials_frame(rows, "minimize")["number"]) == [2, 0, 1]
    assert list(table.trials_frame(rows, "maximize")["number"]) == [0, 2, 1]
