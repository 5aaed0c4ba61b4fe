"""Result tables: the only module that imports pandas.

A table has one row per trial: number, state, objective value, params (``params.<name>``),
epochs run, duration, and the MLflow run id, best first.  ``searchlab report`` prints it and
writes it as CSV or Parquet; ``searchlab.results()`` returns it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

FIRST_COLUMNS = ["number", "state", "value", "epochs", "duration_s", "run_id"]


def trials_frame(rows: Iterable[Mapping[str, Any]], direction: str = "maximize") -> pd.DataFrame:
    """Rows (dicts with ``params`` as a nested dict) -> a DataFrame sorted best first.

    Complete trials come first ordered by value, then pruned, then failed ones by number.
    """
    flat = []
    for row in rows:
        item = {k: v for k, v in row.items() if k != "params"}
        for name, value in (row.get("params") or {}).items():
            item[f"params.{name}"] = value
        flat.append(item)
    frame = pd.DataFrame(flat)
    if frame.empty:
        return pd.DataFrame(columns=FIRST_COLUMNS)
    order = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}
    frame["_state_order"] = frame["state"].map(order).fillna(4)
    values = pd.to_numeric(frame["value"], errors="coerce")  # all None: failed trials only
    frame["_value"] = values if direction == "minimize" else -values
    frame = frame.sort_values(["_state_order", "_value", "number"], na_position="last")
    frame = frame.drop(columns=["_state_order", "_value"]).reset_index(drop=True)
    first = [c for c in FIRST_COLUMNS if c in frame.columns]
    rest = [c for c in frame.columns if c not in first]
    return frame[first + rest]


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    return _whole(path, lambda tmp: frame.to_csv(tmp, index=False))


def to_csv(frame: pd.DataFrame) -> str:
    """The table as CSV text (what ``write_csv`` writes)."""
    return str(frame.to_csv(index=False))


def to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The table as one dict per row, JSON-ready: missing values are None."""
    import json

    return list(json.loads(frame.to_json(orient="records", double_precision=15)))


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    return _whole(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _whole(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``: a
    failure (a full disk, a kill) leaves the previous file or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_text(frame: pd.DataFrame, max_rows: int | None = None) -> str:
    """The table as aligned text for a terminal; floats with 4 significant digits."""
    if frame.empty:
        return "(no trials)"
    return frame.to_string(
        index=False, max_rows=max_rows, float_format=lambda v: f"{v:.4g}", na_rep="-"
    )


def reeval_frame(rows: Iterable[Mapping[str, Any]], direction: str = "maximize") -> pd.DataFrame:
    """Re-evaluation rows (trial, mean, std, n, search_value) sorted by mean, best first."""
    frame = pd.DataFrame(list(rows), columns=["trial", "mean", "std", "n", "search_value"])
    return frame.sort_values(
        ["mean", "trial"], ascending=[direction == "minimize", True], na_position="last"
    ).reset_index(drop=True)
