"""Benchmark: VGG16 transfer search with searchlab (feature cache) vs plain KerasTuner.

The same space (head_width, dropout, learning_rate, batch_size; frozen_layers fixed per
case), the same data (CIFAR-10 from the data directory, pixels 0..255), the same VGG16
backbone weights file (ImageNet weights when the data directory has them, else one random
VGG16 written once and loaded by both sides), the same trials and epochs, one after the
other in this process.  KerasTuner is used as its users write it: a ``build_model(hp)`` that
stacks VGG16 and a head, and ``RandomSearch`` -- every trial pushes every image through the
whole backbone in every epoch.  Its trials are split into two searches (seeds ``seed`` and
``seed+1``) that run before and after searchlab's, so a drift in the machine's speed during
a case weighs on both sides alike; each side is timed from creating its tuner or opening
its stores, after the other's leftovers are collected, and both after their libraries are
imported (``_import_both``).  searchlab runs ``studies``-style ``Transfer`` trials through its
Optuna engine with MLflow tracking on (every overhead but the imports included: opening the
stores, the session's best model logged as an MLflow Model), with an empty feature cache at
the start of each case.

Cases: ``frozen`` (all 18 VGG16 layers frozen: only the head trains) and ``block5``
(frozen_layers=14: block5 and the head train); ``handwritten``: not ``Transfer`` but the
hand-written ``build_model(hp)`` of ``studies/handwritten_vgg.py`` (a frozen VGG16 inside a
``Sequential``, a Flatten/Dense/Dropout/Dense head), the same function given to searchlab
(``space=None``: automatic frozen-prefix detection) and to KerasTuner's ``RandomSearch``,
both at batch size 32 with the same weights file; ``dropin``: one KerasTuner-style script
(``dropin_search``: ``RandomSearch`` of that ``build_model`` and ``search(x, y, ...)``) run
twice, with ``import keras_tuner`` and with ``import searchlab.keras_tuner`` -- the same
data, weights file, trials and epochs.

    python scripts/bench_transfer.py                       # 20 trials x 2 epochs per case
    python scripts/bench_transfer.py --trials 10 --kt-trials 4 --cases frozen
    python scripts/bench_transfer.py --cases frozen,handwritten
    python scripts/bench_transfer.py --cases handwritten,dropin   # issue 27's comparison

Prints, per case, trials per hour for each tool, their ratio, and each one's best
val_accuracy; and the ceiling of that ratio at this machine's speed: the ratio searchlab
would reach if its own work (stores, tracking, tracing, copying) cost nothing, and its trials
only the work no tool avoids -- one pass of the images through the frozen layers, the user's
``build_model`` per trial (``handwritten``), training the head (``unavoidable``).  Timing
claims come only from this script's output.

Set-up on a fresh clone: ``source scripts/_env.sh dev`` (a .venv with the project and its
``dev`` extra, which includes ``bench``: tensorboard, which KerasTuner's ``RandomSearch``
imports; and ``SEARCHLAB_DATA_DIR`` set to ``../shared/data`` when that exists), or
``pip install -e '.[bench]'`` in an environment of your own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CASES = {"frozen": 18, "block5": 14, "handwritten": 18, "dropin": 18}
HANDWRITTEN = Path(__file__).resolve().parent.parent / "studies" / "handwritten_vgg.py"


def handwritten_build(weights: Path):
    """``build_model(hp)`` of ``studies/handwritten_vgg.py``, reading ``weights``."""
    import importlib.util

    os.environ["HANDWRITTEN_VGG_WEIGHTS"] = str(weights)
    spec = importlib.util.spec_from_file_location("handwritten_vgg", HANDWRITTEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model


def make_weights(tmp: Path) -> Path:
    """ImageNet notop weights from the data directory if there, else a fixed random VGG16."""
    import keras

    from searchlab.models.transfer import resolve_weights

    found = resolve_weights("vgg16", "imagenet")
    if found is not None:
        return found
    keras.utils.set_random_seed(1234)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp / "vgg16_random_notop.weights.h5"
    model.save_weights(path)
    keras.backend.clear_session()
    return path


def space(case: str):
    from searchlab import Choice, Float

    return {
        "frozen_layers": Choice([CASES[case]]),
        "head_width": Choice([128, 256, 512]),
        "dropout": Float(0.0, 0.5),
        "learning_rate": Float(1e-4, 3e-3, log=True),
        "batch_size": Choice([32, 64]),
    }


class Quiet:
    def __init__(self) -> None:
        self.training = 0.0  # seconds in training epochs, summed over the trials

    def started(self, *a):
        pass

    def trial_started(self, *a):
        pass

    def trial_finished(self, result, best):
        self.training += sum(result.history.get("epoch_s", []))
        print(
            f"    searchlab trial {result.number}: {result.state.value} "
            f"val_accuracy={result.value if result.value is not None else float('nan'):.4f} "
            f"{result.duration:.1f}s cache={result.tags.get('searchlab.cache_phases')}"
            + (
                f" ({result.tags['searchlab.cache.reason']})"
                if "searchlab.cache.reason" in result.tags
                else ""
            ),
            flush=True,
        )

    def finished(self, summary):
        pass


def dropin_search(kt, build, d, *, trials: int, seed: int, directory: Path, name: str, epochs: int):
    """Case ``dropin``'s script, as a KerasTuner user writes it: the same lines for both
    sides, ``kt`` is ``keras_tuner`` or ``searchlab.keras_tuner``."""
    tuner = kt.RandomSearch(
        build,
        objective="val_accuracy",
        max_trials=trials,
        seed=seed,
        directory=str(directory),
        project_name=name,
        overwrite=True,
    )
    tuner.search(
        d.x_train,
        d.y_train,
        epochs=epochs,
        batch_size=32,
        validation_data=(d.x_val, d.y_val),
        verbose=0,
    )
    return tuner


def run_dropin(args, weights: Path, tmp: Path) -> tuple[float, float, int]:
    """Case ``dropin``, searchlab's side: ``dropin_search`` with ``searchlab.keras_tuner``."""
    import searchlab.keras_tuner as skt
    from searchlab import Dataset
    from searchlab import data as data_mod

    d = data_mod.load(
        Dataset("cifar10", validation="test", subset=_subset(args), scale=False), args.data_dir
    )
    build = handwritten_build(weights)
    _no_pruning()
    _clean_slate()
    started = time.perf_counter()
    tuner = dropin_search(skt, build, d, trials=args.trials, seed=args.seed,
                          directory=tmp / "dropin", name="dropin", epochs=args.epochs)  # fmt: skip
    seconds = time.perf_counter() - started
    done = tuner.oracle.get_best_trials(args.trials)
    for t in done:
        print(f"    searchlab.keras_tuner trial {t.trial_id}: val_accuracy={t.score:.4f}")
    best = max((t.score for t in done if t.score is not None), default=float("nan"))
    return seconds, float(best), len(done)


def run_searchlab(
    case: str, args, weights: Path, tmp: Path, listener: Quiet
) -> tuple[float, float, int]:
    from searchlab import Dataset, Study, engines, runner
    from searchlab.models import Transfer
    from searchlab.tracking import MlflowTracker
    from searchlab.training import cache

    home = tmp / f"searchlab-{case}"
    os.environ["SEARCHLAB_HOME"] = str(home)
    cache.default_cache().clear_memory()
    if case == "dropin":
        return run_dropin(args, weights, tmp)
    model: object = Transfer("vgg16", weights=str(weights))
    searched = space(case)
    if case == "handwritten":  # the user's own code declares its space
        model, searched = handwritten_build(weights), None
    study = Study(
        name=f"bench-{case}",
        space=searched,
        model=model,  # type: ignore[arg-type]
        data=Dataset("cifar10", validation="test", subset=_subset(args), scale=False),
        strategy="random",
        trials=args.trials,
        epochs=args.epochs,
        seed=args.seed,
    )
    options = engines.RunOptions(
        strategy="random",
        trials=args.trials,
        timeout=None,
        epochs=args.epochs,
        seed=args.seed,
        storage=f"sqlite:///{home / 'optuna.db'}",
        data_dir=args.data_dir,
        max_failures=3,
    )
    _no_pruning()
    tracker = MlflowTracker(f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts")
    from searchlab import data as data_mod

    data_mod.load(study.dataset, args.data_dir)  # both sides start with the arrays loaded
    _clean_slate()
    started = time.perf_counter()
    summary = runner.run(study, options, tracker, listener)
    seconds = time.perf_counter() - started
    return seconds, float(summary["best_value"] or float("nan")), int(summary["n_complete"])


def unavoidable(case: str, args, weights: Path) -> tuple[float, float]:
    """What no tool's trials avoid, timed outside both tools' runs: one pass of the images
    through the frozen VGG16 (as searchlab's feature cache computes it), and for the
    ``handwritten`` case one call of the user's ``build_model(hp)`` (median of 3; searchlab
    builds ``Transfer``'s heads itself).  With the head's training epochs they bound the
    ratio: ``ceiling`` in ``main``."""
    import statistics

    import keras
    import keras_tuner as kt

    from searchlab import Dataset, backend
    from searchlab import data as data_mod
    from searchlab.training import cache

    d = data_mod.load(
        Dataset("cifar10", validation="test", subset=_subset(args), scale=False), args.data_dir
    )
    base = keras.applications.VGG16(
        include_top=False, weights=str(weights), input_shape=(32, 32, 3)
    )
    started = time.perf_counter()
    for x in (d.x_train, d.x_val):
        backend.predict_arrays(base, x, cache.feature_batch(d))
    features = time.perf_counter() - started
    build = 0.0
    if case in ("handwritten", "dropin"):
        builder, seconds = handwritten_build(weights), []
        for _ in range(3):
            started = time.perf_counter()
            builder(kt.HyperParameters())
            seconds.append(time.perf_counter() - started)
        build = statistics.median(seconds)
    _clean_slate()
    return features, build


def _clean_slate() -> None:
    """Free what the other tool's run left (its models, Keras's global state) before a side
    is timed: 10 KerasTuner trials leave 10 VGG16 models' garbage, which every later
    collection walks (a separate searchlab process starts without it).  Then put what is
    left out of later collections' walks, as a searchlab worker process does with what its
    imports made (``trial.freeze_imports``); KerasTuner's side gets the same."""
    import gc

    import keras

    from searchlab.training import freeze_imports

    keras.backend.clear_session()
    gc.collect()
    freeze_imports()


def _no_pruning() -> None:
    """Every trial runs all its epochs, as in KerasTuner's RandomSearch: the Optuna engine's
    default pruner (Optuna's MedianPruner) would stop weak trials early and flatter us."""
    import functools

    import optuna

    from searchlab import store as engine

    if not isinstance(engine.optuna.create_study, functools.partial):
        engine.optuna.create_study = functools.partial(
            optuna.create_study, pruner=optuna.pruners.NopPruner()
        )


def _subset(args) -> dict[str, int] | None:
    sizes = {}
    if args.train:
        sizes["train"] = args.train
    if args.val:
        sizes["val"] = args.val
    return sizes or None


def run_kerastuner(
    case: str, args, weights: Path, tmp: Path, trials: int, seed: int, name: str
) -> tuple[float, float, int]:
    import keras
    import keras_tuner as kt

    from searchlab import Dataset
    from searchlab import data as data_mod

    d = data_mod.load(
        Dataset("cifar10", validation="test", subset=_subset(args), scale=False), args.data_dir
    )
    frozen = CASES[case]

    class VGGHead(kt.HyperModel):
        def build(self, hp):
            base = keras.applications.VGG16(
                include_top=False, weights=str(weights), input_shape=(32, 32, 3)
            )
            for layer in base.layers[1 : frozen + 1]:  # layers[0] is the input
                layer.trainable = False
            inputs = keras.Input(shape=(32, 32, 3))
            x = keras.applications.vgg16.preprocess_input(inputs)
            x = base(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            x = keras.layers.Dense(hp.Choice("head_width", [128, 256, 512]), activation="relu")(x)
            x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5))(x)
            outputs = keras.layers.Dense(10, activation="softmax")(x)
            model = keras.Model(inputs, outputs)
            model.compile(
                optimizer=keras.optimizers.Adam(
                    hp.Float("learning_rate", 1e-4, 3e-3, sampling="log")
                ),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            return model

        def fit(self, hp, model, *fit_args, **kwargs):
            return model.fit(*fit_args, batch_size=hp.Choice("batch_size", [32, 64]), **kwargs)

    hypermodel: object = VGGHead()
    fit_kwargs = {}
    if case == "dropin":  # the very script searchlab's side runs, on keras_tuner itself
        build = handwritten_build(weights)
        _clean_slate()
        started = time.perf_counter()
        tuner = dropin_search(kt, build, d, trials=trials, seed=seed, directory=tmp / "kt",
                              name=name, epochs=args.epochs)  # fmt: skip
        return _kt_result(tuner, name, time.perf_counter() - started)
    if case == "handwritten":  # the same file searchlab ran, unchanged
        hypermodel, fit_kwargs = handwritten_build(weights), {"batch_size": 32}
    _clean_slate()
    started = time.perf_counter()
    tuner = kt.RandomSearch(
        hypermodel,
        objective="val_accuracy",
        max_trials=trials,
        seed=seed,
        directory=str(tmp / "kt"),
        project_name=name,
        overwrite=True,
    )
    tuner.search(
        d.x_train,
        d.y_train,
        epochs=args.epochs,
        validation_data=(d.x_val, d.y_val),
        verbose=0,
        **fit_kwargs,
    )
    return _kt_result(tuner, name, time.perf_counter() - started)


def _kt_result(tuner, name: str, seconds: float) -> tuple[float, float, int]:
    done = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    for t in done:
        print(f"    keras-tuner {name} trial {t.trial_id}: val_accuracy={t.score:.4f}", flush=True)
    best = max((t.score for t in done if t.score is not None), default=float("nan"))
    return seconds, float(best), len(done)


def _import_both() -> None:
    """Import each tool's libraries before either is timed: KerasTuner's side is timed from
    creating its tuner, after ``import keras_tuner``; searchlab's imports MLflow and Optuna
    on first use (about 1.5 s on a 2-core CPU), and MLflow its SQL store's module when it
    opens one (0.5 s: SQLAlchemy configures MLflow's tables' classes as it is imported),
    which would otherwise fall inside its time.  (``python -X importtime``: what either side
    imports while timed then takes under 0.1 s.)"""
    import keras_tuner  # noqa: F401
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import optuna  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401


def check_setup() -> None:
    """Stop at once, not hours in, where KerasTuner's side of the comparison cannot run."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:  # KerasTuner's RandomSearch imports it
        sys.exit(
            "KerasTuner's RandomSearch needs tensorboard: source scripts/_env.sh dev, or "
            "pip install -e '.[bench]' (see this script's docstring)."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--kt-trials",
        type=int,
        default=None,
        help="KerasTuner trials, if fewer (its trials all cost the same)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", default="frozen,block5")
    parser.add_argument("--train", type=int, default=None, help="at most this many train images")
    parser.add_argument("--val", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("SEARCHLAB_DATA_DIR"))
    args = parser.parse_args()
    check_setup()

    import keras

    _import_both()
    keras.utils.set_random_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp_:
        tmp = Path(tmp_)
        weights = make_weights(tmp)
        print(
            f"backbone weights: {weights}; backend {keras.backend.backend()}; "
            f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for case in args.cases.split(","):
            print(f"== case {case} (frozen_layers={CASES[case]})", flush=True)
            # KerasTuner's trials bracket searchlab's run (half before, half after, as two
            # searches with their own seeds), so a machine that speeds up or slows down
            # during the case weighs on both tools alike.
            kt_trials = args.kt_trials or args.trials
            before = run_kerastuner(
                case, args, weights, tmp, (kt_trials + 1) // 2, args.seed, f"{case}-before"
            )
            listener = Quiet()
            s_sec, s_best, s_n = run_searchlab(case, args, weights, tmp, listener)
            print(f"  searchlab: {s_n} trials in {s_sec:.0f}s", flush=True)
            after = (
                run_kerastuner(
                    case, args, weights, tmp, kt_trials // 2, args.seed + 1, f"{case}-after"
                )
                if kt_trials > 1
                else (0.0, float("nan"), 0)
            )
            k_sec, k_n = before[0] + after[0], before[2] + after[2]
            k_best = max(before[1], after[1]) if after[2] else before[1]
            print(
                f"  keras-tuner: {k_n} trials in {k_sec:.0f}s "
                f"({before[0]:.0f}s before searchlab, {after[0]:.0f}s after)",
                flush=True,
            )
            features, build = unavoidable(case, args, weights)
            floor = features + s_n * build + listener.training
            print(
                f"  searchlab's {s_sec:.1f}s hold {floor:.1f}s that no tool avoids: the frozen "
                f"layers' pass over the images {features:.1f}s, the user's build_model "
                f"{s_n} x {build:.2f}s, training the head {listener.training:.1f}s "
                "(its epochs' epoch_s)",
                flush=True,
            )
            rows.append((case, s_n, s_sec, s_best, k_n, k_sec, k_best, floor))
    print()
    print(
        f"{'case':8} {'tool':12} {'trials':>6} {'seconds':>8} {'trials/h':>9} {'best val_acc':>12}"
    )
    for case, s_n, s_sec, s_best, k_n, k_sec, k_best, floor in rows:
        s_rate, k_rate = s_n / s_sec * 3600, k_n / k_sec * 3600
        print(f"{case:8} {'searchlab':12} {s_n:6d} {s_sec:8.0f} {s_rate:9.1f} {s_best:12.4f}")
        print(f"{case:8} {'keras-tuner':12} {k_n:6d} {k_sec:8.0f} {k_rate:9.1f} {k_best:12.4f}")
        print(
            f"{case:8} ratio (searchlab / keras-tuner trials per hour): {s_rate / k_rate:.1f}x; "
            f"best val_accuracy difference: {100 * (s_best - k_best):+.1f} points"
        )
        print(
            f"{case:8} ceiling (searchlab's own work free, {floor:.1f}s for {s_n} trials): "
            f"{s_n / floor * 3600 / k_rate:.1f}x"
        )
    print(f"epochs per trial: {args.epochs}; load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
