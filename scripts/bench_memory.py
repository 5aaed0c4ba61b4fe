#!/usr/bin/env python
"""Memory over many trials: searchlab (as `searchlab run`, and in-process) vs KerasTuner.

    PYTHONPATH=. python scripts/bench_memory.py [--trials 50] [--train 1000] [--val 200]

Three runs, each in its own fresh process: ``searchlab run STUDY`` as a user types it
(trials in a worker process that is replaced once it grew by --recycle-mb), searchlab's
engine called in-process (``searchlab run --in-process``, what the Python API does), and a
plain KerasTuner RandomSearch.  All on the same dense MNIST model and space as
``studies/mnist_dense.py`` (1 epoch per trial, a subset of MNIST), and reports its resident
memory after trial 5 and after the last trial: the peak (``ru_maxrss``) and the current RSS.
The figure to watch is the growth from trial 5 to the end (target for searchlab: <= 100 MB).
Prints one table; all figures come from this one run.

Set-up on a fresh clone: ``source scripts/_env.sh dev`` (a .venv with the project and its
``dev`` extra, which includes ``bench``: tensorboard, which KerasTuner's ``RandomSearch``
imports; and ``SEARCHLAB_DATA_DIR`` set to ``../shared/data`` when that exists), or
``pip install -e '.[bench]'`` in an environment of your own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHECKPOINT = 5


def rss_mb() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


class Recorder:
    def __init__(self, last: int) -> None:
        self.last = last
        self.done = 0
        self.marks: dict[str, list[float]] = {}
        self.started = time.perf_counter()

    def trial_done(self) -> None:
        self.done += 1
        if self.done in (CHECKPOINT, self.last):
            self.marks[str(self.done)] = list(rss_mb())


def run_searchlab(args: argparse.Namespace, out: dict) -> None:
    from searchlab import Choice, Dataset, Float, Int, Study, engines, runner
    from searchlab.engines import NullListener
    from searchlab.models import dense_classifier
    from searchlab.tracking import MlflowTracker

    home = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    study = Study(
        name="bench-memory",
        space={
            "layers": Int(1, 3),
            "units": Int(32, 256, step=32),
            "dropout": Float(0.0, 0.5),
            "learning_rate": Float(1e-4, 1e-2, log=True),
            "batch_size": Choice([64, 128, 256]),
        },
        model=dense_classifier,
        data=Dataset("mnist", validation="test", subset={"train": args.train, "val": args.val}),
        strategy="random",
        trials=args.trials,
        epochs=1,
    )
    rec = Recorder(args.trials)

    class Listener(NullListener):
        def trial_finished(self, result, best) -> None:  # noqa: ANN001 - protocol signature
            rec.trial_done()

    options = engines.RunOptions(
        strategy="random",
        trials=args.trials,
        timeout=None,
        epochs=1,
        seed=0,
        storage=f"sqlite:///{home / 'optuna.db'}",
    )
    tracker = MlflowTracker(f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts")
    runner.run(study, options, tracker, Listener())
    out.update(marks=rec.marks, seconds=time.perf_counter() - rec.started)


STUDY_FILE = """
from searchlab import Choice, Dataset, Float, Int, Study
from searchlab.models import dense_classifier

study = Study(
    name="bench-memory-workers",
    space={"layers": Int(1, 3), "units": Int(32, 256, step=32), "dropout": Float(0.0, 0.5),
           "learning_rate": Float(1e-4, 1e-2, log=True), "batch_size": Choice([64, 128, 256])},
    model=dense_classifier,
    data=Dataset("mnist", validation="test", subset={"train": TRAIN, "val": VAL}),
    strategy="random", trials=TRIALS, epochs=1,
)
"""


def _worker_peaks(launcher: int) -> dict[int, float]:
    """Peak RSS (VmHWM, MB) of every live child process of ``launcher``."""
    peaks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != launcher:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[int(stat.parent.name)] = int(line.split()[1]) / 1024
    return peaks


def run_cli(args: argparse.Namespace, out: dict) -> None:
    """``searchlab run STUDY``: trials in a worker process that the launcher restarts when it
    grew by more than --recycle-mb; the figure is the worker's peak RSS."""
    home = Path(tempfile.mkdtemp(prefix="bench-memory-w-"))
    study = home / "study.py"
    study.write_text(
        STUDY_FILE.replace("TRAIN", str(args.train))
        .replace("VAL", str(args.val))
        .replace("TRIALS", str(args.trials))
    )
    env = dict(os.environ, SEARCHLAB_HOME=str(home), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchlab.cli", "run", str(study)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peak, done, marks, workers = 0.0, 0, {}, set()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.wait(0.2):
            seen = _worker_peaks(proc.pid)
            workers.update(seen)
            peak = max([peak, *seen.values()])

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if "complete:" in line or "pruned after" in line or "failed:" in line:
            done += 1
            if done in (CHECKPOINT, args.trials):
                current = max(_worker_peaks(proc.pid).values(), default=peak)
                marks[str(done)] = [max(peak, current), current]
    proc.wait()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"searchlab run failed with exit code {proc.returncode}")
    out.update(marks=marks, seconds=time.perf_counter() - started, processes=len(workers))


def run_kerastuner(args: argparse.Namespace, out: dict) -> None:
    import keras
    import keras_tuner as kt

    from searchlab.data import Dataset, info_of, load
    from searchlab.models import dense_classifier

    data = load(Dataset("mnist", validation="test", subset={"train": args.train, "val": args.val}))
    info = info_of(data)
    rec = Recorder(args.trials)

    def build(hp: kt.HyperParameters) -> keras.Model:
        params = {
            "layers": hp.Int("layers", 1, 3),
            "units": hp.Int("units", 32, 256, step=32),
            "dropout": hp.Float("dropout", 0.0, 0.5),
            "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log"),
        }
        return dense_classifier(params, info)

    class Tuner(kt.RandomSearch):
        def run_trial(self, trial, *a, **kw):  # noqa: ANN001, ANN002, ANN003 - KerasTuner's
            kw["batch_size"] = trial.hyperparameters.Choice("batch_size", [64, 128, 256])
            return super().run_trial(trial, *a, **kw)

        def on_trial_end(self, trial) -> None:  # noqa: ANN001
            super().on_trial_end(trial)
            rec.trial_done()

    tuner = Tuner(
        build,
        objective="val_accuracy",
        max_trials=args.trials,
        seed=0,
        overwrite=True,
        directory=tempfile.mkdtemp(prefix="bench-memory-kt-"),
        project_name="bench",
    )
    tuner.search(
        data.x_train, data.y_train, validation_data=(data.x_val, data.y_val), epochs=1, verbose=0
    )
    out.update(marks=rec.marks, seconds=time.perf_counter() - rec.started)


PARTS = {"searchlab run": run_cli, "in-process": run_searchlab, "kerastuner": run_kerastuner}


def check_setup() -> None:
    """Stop at once, not hours in, where KerasTuner's side of the comparison cannot run."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # KerasTuner's RandomSearch imports it
        sys.exit(
            "KerasTuner's RandomSearch needs tensorboard: source scripts/_env.sh dev, or "
            "pip install -e '.[bench]' (see this script's docstring)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--part", choices=list(PARTS))
    args = parser.parse_args()
    if args.part in (None, "kerastuner"):
        check_setup()
    if args.part:
        import logging

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.disable(logging.WARNING)
        out: dict = {"part": args.part}
        PARTS[args.part](args, out)
        print("RESULT " + json.dumps(out), flush=True)
        return

    results = {}
    for part in PARTS:
        cmd = [
            sys.executable,
            __file__,
            "--part",
            part,
            "--trials",
            str(args.trials),
            "--train",
            str(args.train),
            "--val",
            str(args.val),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[part] = json.loads(line[len("RESULT ") :])

    last = str(args.trials)
    print(
        f"{args.trials} trials, 1 epoch each, MNIST subset {args.train}/{args.val}, "
        "dense net (layers, units, dropout, learning_rate, batch_size)"
    )
    print(
        f"{'':17} {'peak@5':>9} {'peak@' + last:>9} {'growth':>8} "
        f"{'rss@5':>8} {'rss@' + last:>8} {'growth':>8} {'wall s':>7}"
    )
    for part, res in results.items():
        p5, r5 = res["marks"][str(CHECKPOINT)]
        pn, rn = res["marks"][last]
        print(
            f"{part:17} {p5:8.0f}M {pn:8.0f}M {pn - p5:+7.0f}M "
            f"{r5:7.0f}M {rn:7.0f}M {rn - r5:+7.0f}M {res['seconds']:7.0f}"
        )
    if "processes" in results["searchlab run"]:
        print(
            f"searchlab run used {results['searchlab run']['processes']} worker processes "
            "(one replaced each time it grew by --recycle-mb, 100 MB)"
        )


if __name__ == "__main__":
    main()
