#!/usr/bin/env python
"""How much time searchlab adds to each trial, outside ``model.fit``.

Runs the MNIST study (random search, a training subset, 1 epoch) for N trials in one
process against fresh SQLite stores, and prints per trial: the wall time from the end of one
trial to the end of the next (ask, sampling, model build, fit, per-epoch MLflow logging,
best-weights save and upload, Optuna tell, best-so-far lookup), the time inside
``model.fit``, and their difference, the overhead. Then the medians, and the one-off
study-end cost (trials table + best model artifact).

    scripts/bench_overhead.py [--trials 12] [--subset 2000,500]

Set-up on a fresh clone: ``source scripts/_env.sh dev`` (a .venv with the project and its
``dev`` extra, and ``SEARCHLAB_DATA_DIR`` set to ``../shared/data`` when that exists), or
``pip install -e '.[bench]'`` in an environment of your own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent


class Timing:
    def __init__(self) -> None:
        self.marks: list[float] = []
        self.fit: list[float] = []
        self.build_and_save: list[float] = []
        self.end = 0.0

    def started(self, name, done, total, info) -> None:
        self.marks.append(time.perf_counter())

    def trial_started(self, number, index, total, params) -> None:
        pass

    def trial_finished(self, result, best) -> None:
        self.marks.append(time.perf_counter())
        self.fit.append(result.fit_seconds)
        print(
            f"  trial {result.number:2d}: {result.state.value:8s} wall "
            f"{self.marks[-1] - self.marks[-2]:.3f}s fit {result.fit_seconds:.3f}s",
            flush=True,
        )

    def finished(self, summary) -> None:
        self.end = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--subset", default="2000,500")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    if args.trials < 10:
        parser.error("use at least 10 trials")
    if not os.environ.get("SEARCHLAB_DATA_DIR") and (REPO.parent / "shared/data").is_dir():
        os.environ["SEARCHLAB_DATA_DIR"] = str(REPO.parent / "shared/data")

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as home:
        os.environ["SEARCHLAB_HOME"] = home
        from searchlab import config, engines, load_study, runner
        from searchlab.tracking import MlflowTracker

        study = load_study(REPO / "studies/mnist_dense.py")
        train, val = (int(v) for v in args.subset.split(","))
        study = dataclasses.replace(
            study, data=dataclasses.replace(study.dataset, subset={"train": train, "val": val})
        )
        options = engines.RunOptions(
            strategy="random",
            trials=args.trials,
            timeout=None,
            epochs=args.epochs,
            seed=0,
            storage=config.default_storage(),
        )
        timing = Timing()
        tracker = MlflowTracker(config.default_tracking_uri(), config.default_artifact_root())
        runner.run(study, options, tracker, timing)

    walls = [b - a for a, b in zip(timing.marks, timing.marks[1:], strict=False)]
    # The first trial pays one-off costs (graph tracing, store creation); report it apart.
    steady = list(zip(walls[1:], timing.fit[1:], strict=True))
    overhead = [w - f for w, f in steady]
    print()
    print(f"trials: {len(walls)} (first one excluded from the medians: {walls[0]:.2f}s wall)")
    print(f"median wall per trial   : {statistics.median(w for w, _ in steady):.3f} s")
    print(f"median model.fit time   : {statistics.median(f for _, f in steady):.3f} s")
    print(
        f"median overhead / trial : {statistics.median(overhead):.3f} s "
        f"(min {min(overhead):.3f}, max {max(overhead):.3f}) target <= 0.300 s"
    )
    print(f"study end (table + best model artifact): {timing.end - timing.marks[-1]:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
