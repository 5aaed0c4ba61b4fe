"""Run a fixed 15-trial mix of studies and print what must not change under a refactoring of
the training core: every trial's state, value, best epoch, per-epoch history, tags (timing and
path tags left out) and the sha256 of its best weights; the last line is the sha256 of it all.

    .venv/bin/python scripts/check_identical.py > /tmp/after.txt
    (cd ../main && .venv/bin/python ../h-training/scripts/check_identical.py) > /tmp/before.txt
    diff /tmp/before.txt /tmp/after.txt

The mix: a dense net on an MNIST subset (TPE, two executions a trial, one re-evaluation), a hand-written model around a frozen backbone (the automatic feature
cache, the median pruner),
a two-phase ``Transfer`` VGG16 with weights=None on a tiny CIFAR-10 subset (the suffix pool)
and a KerasTuner HyperModel with its own ``fit``.  It runs through ``runner.run`` with an
``MlflowTracker`` in a temporary folder (the best model is logged and loaded back), so it
needs only the import path of ``runner``; each trial's result is
taken from the trainer the runner calls (``run_trial``, wherever it lives).  Left out as
they differ from run to run: wall times (``epoch_s``, tags about time), MLflow ids.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_tuner  # noqa: E402

from searchlab import Choice, Dataset, Float, Int, Study, engines, runner  # noqa: E402
from searchlab.models import FineTune, Transfer, dense_classifier  # noqa: E402
from searchlab.tracking import MlflowTracker  # noqa: E402

DATA = os.environ.get(
    "SEARCHLAB_DATA_DIR", str(Path(__file__).resolve().parents[1] / "../shared/data")
)
SKIP_TAGS = ("time", "seconds", "duration", "path", "host", "pid", "device", "worker", "git")
#: summary keys that name MLflow runs and models: new ids in every run
SKIP_SUMMARY = ("run_id", "uri")

RESULTS: list[dict] = []


def _trainer_module():
    for name in ("searchlab.training", "searchlab.trial"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "run_trial"):
            return module
    raise SystemExit("no run_trial found")


def _record(study_name: str, real):
    def run_trial(number, params, spec, workdir, *args, **kwargs):
        result = real(number, params, spec, workdir, *args, **kwargs)
        digest = None
        if result.weights_path is not None and Path(result.weights_path).exists():
            digest = hashlib.sha256(Path(result.weights_path).read_bytes()).hexdigest()
        tags = {k: v for k, v in sorted(result.tags.items()) if not any(s in k for s in SKIP_TAGS)}
        RESULTS.append(
            {
                "study": study_name,
                "number": result.number,
                "params": {k: repr(v) for k, v in sorted(result.params.items())},
                "state": str(result.state),
                "value": repr(result.value),
                "best_epoch": result.best_epoch,
                "history": {
                    k: [repr(float(x)) for x in v]
                    for k, v in sorted(result.history.items())
                    if not k.endswith("epoch_s")  # wall time
                },
                "tags": tags,
                "error": result.error,
                "weights": Path(result.weights_path).name if result.weights_path else None,
                "sha256": digest,
            }
        )
        return result

    return run_trial


class FrozenTinyHandwritten:
    """A hand-written compiled model around a frozen backbone whose weights come from a file."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights

    def __call__(self, params):
        base = _tiny_backbone()
        base.load_weights(self.weights)
        base.trainable = False
        inputs = keras.Input((32, 32, 3))
        x = keras.ops.subtract(inputs, 0.5)
        x = base(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(params["units"], activation="relu")(x)
        x = keras.layers.Dropout(params["dropout"])(x)
        outputs = keras.layers.Dense(10, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.Adam(params["learning_rate"]),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model


def _tiny_backbone() -> keras.Model:
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="tiny_conv1")(inputs)
    x = keras.layers.BatchNormalization(name="tiny_bn")(x)
    x = keras.layers.MaxPooling2D(4, name="tiny_pool")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="tiny_conv2")(x)
    return keras.Model(inputs, x, name="tiny")


class OwnFit(keras_tuner.HyperModel):
    def build(self, hp):
        model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten()])
        model.add(keras.layers.Dense(hp.Int("units", 16, 32, step=16), activation="relu"))
        model.add(keras.layers.Dense(10, activation="softmax"))
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        return model

    def fit(self, hp, model, *args, **kwargs):
        return model.fit(
            *args,
            shuffle=hp.Boolean("shuffle"),
            batch_size=hp.Choice("batch_size", [32, 64]),
            **kwargs,
        )


def studies(folder: Path) -> list[tuple[Study, dict]]:
    keras.utils.set_random_seed(1234)
    tiny = _tiny_backbone()
    bn = tiny.get_layer("tiny_bn")
    bn.set_weights([w + 0.1 * (i + 1) for i, w in enumerate(bn.get_weights())])
    tiny.save_weights(folder / "tiny.weights.h5")
    keras.backend.clear_session()
    cifar = Dataset("cifar10", subset={"train": 64, "val": 32}, validation="test")
    return [
        (
            Study(
                name="check-mnist-dense",
                space={
                    "layers": Int(1, 2),
                    "units": Int(16, 64, step=16),
                    "dropout": Float(0.0, 0.5),
                    "learning_rate": Float(1e-4, 1e-2, log=True),
                    "batch_size": Choice([32, 64]),
                },
                model=dense_classifier,
                data=Dataset("mnist", subset={"train": 600, "val": 200}, validation=0.1),
                objective="val_accuracy",
                direction="maximize",
                strategy="bayesian",
                trials=4,
                epochs=3,
                seed=0,
            ),
            {"executions_per_trial": 2, "reeval_top": 1, "reeval_seeds": 1},
        ),
        (
            Study(
                name="check-handwritten-frozen",
                space={
                    "units": Choice([8, 16]),
                    "dropout": Float(0.0, 0.5),
                    "learning_rate": Float(1e-3, 1e-2, log=True),
                    "batch_size": Choice([16, 32]),
                },
                model=FrozenTinyHandwritten(folder / "tiny.weights.h5"),
                data=cifar,
                objective="val_accuracy",
                direction="maximize",
                strategy="random",
                trials=4,
                epochs=2,
                seed=1,
            ),
            {"pruner": "median", "prune_min_epochs": 1},
        ),
        (
            Study(
                name="check-transfer",
                space={
                    "frozen_layers": Choice([15, 17]),
                    "head_width": Choice([8, 16]),
                    "dropout": Float(0.0, 0.3),
                    "learning_rate": Float(1e-4, 3e-3, log=True),
                    "batch_size": Choice([16, 32]),
                },
                model=Transfer("vgg16", weights=None, fine_tune=FineTune(head_epochs=1, epochs=1)),
                data=cifar,
                objective="val_accuracy",
                direction="maximize",
                strategy="random",
                trials=4,
                epochs=2,
                seed=2,
            ),
            {},
        ),
        (
            Study(
                name="check-hypermodel-fit",
                space=None,
                model=OwnFit(),
                data=Dataset("mnist", subset={"train": 300, "val": 100}),
                objective="val_accuracy",
                strategy="random",
                trials=3,
                epochs=2,
                seed=3,
            ),
            {},
        ),
    ]


def main() -> None:
    module = _trainer_module()
    real = module.run_trial
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the feature cache's disk folder lives under the project
        for study, extra in studies(root):
            options = engines.RunOptions(
                strategy=study.strategy,
                trials=study.trials,
                timeout=None,
                epochs=study.epochs,
                seed=study.seed,
                storage=f"sqlite:///{root / (study.name + '.db')}",
                data_dir=DATA,
                **extra,
            )
            module.run_trial = _record(study.name, real)
            try:
                tracker = MlflowTracker(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts")
                summary = runner.run(study, options, tracker)
            finally:
                module.run_trial = real
            RESULTS.append(
                {
                    "study": study.name,
                    "summary": {
                        k: repr(v)
                        for k, v in sorted(summary.items())
                        if isinstance(v, (int, float, str, type(None)))
                        and not any(s in k for s in SKIP_TAGS + SKIP_SUMMARY)
                    },
                }
            )
    text = "\n".join(json.dumps(r, sort_keys=True) for r in RESULTS)
    print(text)
    trials = sum(1 for r in RESULTS if "number" in r)
    print(f"trials run: {trials}")
    print("sha256:", hashlib.sha256(text.encode()).hexdigest())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
