"""Where a trial's wall time goes, step by step: the MNIST dense study in one process.

Wraps the engine's steps with timers (model build, first and later epochs, the rest of
``fit``, each MLflow and Optuna store call, the best-weights save) and prints the median per
trial, pruned and complete trials apart.  The first trial (the process's one-off start-up)
is left out.

    python scripts/bench_trial_costs.py                       # TPE + ASHA, 20 trials
    python scripts/bench_trial_costs.py --strategy random --pruner none

Set-up on a fresh clone: ``source scripts/_env.sh dev`` (a .venv with the project and its
``dev`` extra, and ``SEARCHLAB_DATA_DIR`` set to ``../shared/data`` when that exists), or
``pip install -e '.[bench]'`` in an environment of your own.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STORE_STEPS = {  # label -> (module or class path, attribute)
    "mlflow start_trial": ("searchlab.tracking:MlflowTracker", "start_trial"),
    "mlflow log_epoch": ("searchlab.tracking:MlflowTracker", "log_epoch"),
    "mlflow end_trial": ("searchlab.tracking:MlflowTracker", "end_trial"),
    "mlflow heartbeat tag": ("searchlab.tracking:MlflowTracker", "tag_session"),
    "optuna claim (ask)": ("searchlab.coordination", "claim_trial"),
    "optuna suggest (TPE)": ("searchlab.space:Space", "suggest"),
    "optuna report": ("optuna.trial:Trial", "report"),
    "optuna should_prune": ("optuna.trial:Trial", "should_prune"),
    "optuna set_user_attr": ("optuna.trial:Trial", "set_user_attr"),
    "optuna tell": ("optuna:Study", "tell"),
    "optuna best trial": ("searchlab.store:StudyStore", "best"),
}
MODEL_STEPS = {
    "release last trial": ("searchlab.training.run", "release_previous_trial"),
    "build model": ("searchlab.training.run", "build_model"),
    "build for fit": ("searchlab.backend", "build_for_fit"),
    "save best weights": ("keras:Model", "save_weights"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--strategy", default="bayesian")
    parser.add_argument("--pruner", default="asha")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("SEARCHLAB_DATA_DIR"))
    args = parser.parse_args()

    import importlib

    import keras

    from searchlab import engines, runner
    from searchlab.study import load_study
    from searchlab.tracking import MlflowTracker

    spent: dict[str, float] = collections.defaultdict(float)

    def wrap(target: str, attr: str, label: str) -> None:
        module, _, cls = target.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        if not hasattr(owner, attr):
            return
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t

        setattr(owner, attr, timed)

    for label, (target, attr) in {**STORE_STEPS, **MODEL_STEPS}.items():
        wrap(target, attr, label)

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            spent["epoch 1 (traces)" if epoch == 0 else "later epochs"] += (
                time.perf_counter() - self.t
            )

    fit = keras.Model.fit

    def timed_fit(self, *a, callbacks=None, **k):
        t = time.perf_counter()
        try:  # EpochTimes first: the epoch's logging (MLflow, Optuna) falls outside it
            return fit(self, *a, callbacks=[EpochTimes(), *(callbacks or [])], **k)
        finally:
            spent["fit"] += time.perf_counter() - t

    keras.Model.fit = timed_fit
    rows: list[dict] = []

    class Listener:
        def started(self, *a):
            self.t = time.perf_counter()

        def trial_started(self, *a):
            pass

        def trial_finished(self, result, best):
            now = time.perf_counter()
            rows.append({**spent, "trial wall": now - self.t, "state": result.state.value})
            spent.clear()
            self.t = now

        def finished(self, summary):
            pass

    study = load_study(REPO / "studies" / "mnist_dense.py")
    study = dataclasses.replace(
        study,
        data=dataclasses.replace(study.dataset, subset={"train": args.train, "val": args.val}),
    )
    with tempfile.TemporaryDirectory(prefix="trial-costs-") as home:
        os.environ["SEARCHLAB_HOME"] = home
        options = engines.RunOptions(
            strategy=args.strategy,
            trials=args.trials,
            timeout=None,
            epochs=args.epochs,
            seed=args.seed,
            storage=f"sqlite:///{home}/optuna.db",
            data_dir=args.data_dir,
            pruner=args.pruner,
            max_failures=args.trials,
        )
        tracker = MlflowTracker(f"sqlite:///{home}/mlflow.db", Path(home) / "mlartifacts")
        runner.run(study, options, tracker, Listener())

    labels = ["trial wall", "fit", "epoch 1 (traces)", "later epochs", *MODEL_STEPS, *STORE_STEPS]
    for state in ("pruned", "complete"):
        group = [r for r in rows[1:] if r["state"] == state]
        if not group:
            continue
        print(f"{state}: {len(group)} trials, median ms per trial")
        for label in labels:
            print(
                f"  {label:24s} {statistics.median(r.get(label, 0.0) for r in group) * 1000:8.1f}"
            )
        stores = [sum(r.get(k, 0.0) for k in STORE_STEPS) for r in group]
        print(f"  {'all store calls':24s} {statistics.median(stores) * 1000:8.1f}")


if __name__ == "__main__":
    main()
