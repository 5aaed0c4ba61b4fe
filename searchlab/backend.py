"""The Keras backend a process runs on: its environment, its devices, its precision policy.

Keras 3 picks its backend (``tensorflow``, ``jax`` or ``torch``) from ``KERAS_BACKEND`` (or
``~/.keras/keras.json``) when it is first imported.  Everything searchlab trains goes through
the Keras 3 API only, so the same study runs on each of them; this module is the one place
that knows how the backends differ: in naming their devices, in building a model before
``fit``, and in what ``fit`` costs per step (``fit_arrays``).  It imports TensorFlow only
inside functions that run on the TensorFlow backend (where Keras has imported it already),
and Keras only inside functions, so ``import searchlab`` stays fast.

Importing this module sets ``TF_FORCE_GPU_ALLOW_GROWTH=true`` unless the environment already
says otherwise: TensorFlow reads it when it first touches a GPU, and with it parallel workers
on one GPU each take the memory they need instead of all of it.  ``import searchlab`` imports
this module first, so that happens before any backend loads.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from searchlab.errors import StudyDefinitionError

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")
#: --precision values: the Keras dtype policies a trial can train under.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
DEFAULT_PRECISION = "float32"
#: the distribution that carries each backend's version
_DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "jax": ("jax",),
    "torch": ("torch",),
}


def configure_environment() -> None:
    """Environment a backend must see before it starts (the user's own settings win)."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


configure_environment()


@dataclass(frozen=True)
class Device:
    """One device a backend can train on: ``kind:index`` as Keras names it, and what it is."""

    kind: str  # "cpu", "gpu" or "tpu"
    index: int
    name: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.index}"

    def __str__(self) -> str:
        return f"{self.label} ({self.name})" if self.name else self.label


#: what TensorFlow prints on its own while it loads, before its logging is set up (so
#: ``TF_CPP_MIN_LOG_LEVEL`` cannot hide it): absl's notice, glog-style lines (oneDNN,
#: CPU features, CUDA plugins) and the CPU-instructions hint
_START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*|To enable the following "
    r"instructions: .*|.*rebuild TensorFlow with the appropriate compiler flags\.)$"
)


def import_quietly() -> None:
    """Import Keras, and so its backend, without the lines the backend's native code prints
    while it loads.

    TensorFlow 2.21 writes them to the process's stderr (file descriptor 2) before absl
    logging is initialised, which is why ``TF_CPP_MIN_LOG_LEVEL`` does not hide them: "All log
    messages before absl::InitializeLog() ...", and the oneDNN notice.  So descriptor 2 is
    pointed at a temporary file while Keras imports, and what was written there is put back
    on stderr but for those lines (an import error, a warning of another kind stays
    visible).  Nothing is turned off: oneDNN stays on (``TF_ENABLE_ONEDNN_OPTS`` untouched),
    so the numbers are the same.  After the import TensorFlow's logging honours
    ``TF_CPP_MIN_LOG_LEVEL``, which the CLI sets to 2.  A no-op once Keras is imported.
    """
    import sys
    import tempfile

    if "keras" in sys.modules:
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        import keras  # noqa: F401

        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines() if not _START_UP_NOISE.match(line)]
            if any(line.strip() for line in kept):
                sys.stderr.write("\n".join(kept) + "\n")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its Python-side notices


def name() -> str:
    """The Keras backend in force (imports Keras)."""
    import keras

    return str(keras.backend.backend())


def requested() -> str:
    """The backend Keras will load, read from the environment only (does not import Keras)."""
    return os.environ.get("KERAS_BACKEND") or _keras_json_backend() or "tensorflow"


def _keras_json_backend() -> str | None:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(base, "keras.json")
    try:
        import json

        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def version(backend: str) -> str | None:
    """The installed version of a backend's package, read from its metadata (no import)."""
    for dist in _DISTRIBUTIONS.get(backend, (backend,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def keras_version() -> str | None:
    try:
        return importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        return None


def model_requirements() -> list[str]:
    """What a saved model needs to load and predict, pinned to what this process runs: Keras,
    the package of the backend in force and NumPy (an MLflow Model's pip requirements)."""
    pins = []
    for choices in (("keras",), _DISTRIBUTIONS.get(name(), ()), ("numpy",)):
        for dist in choices:  # the first one installed (tensorflow or tensorflow-cpu, ...)
            try:
                pins.append(f"{dist}=={importlib.metadata.version(dist)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return pins


def devices() -> list[Device]:
    """The devices the current backend trains on by default: its GPUs (or TPUs) if it sees
    any, else its CPU.  The first one is where a trial runs unless the model says otherwise."""
    backend = name()
    if backend == "jax":
        import jax

        found = jax.devices()
        return [Device(_kind(d.platform), int(d.id), str(d.device_kind)) for d in found]
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [
                Device("gpu", i, torch.cuda.get_device_name(i))
                for i in range(torch.cuda.device_count())
            ]
        return [Device("cpu", 0, "cpu")]
    import keras

    found = keras.distribution.list_devices()
    out = []
    for label in found:
        kind, _, index = str(label).partition(":")
        out.append(Device(_kind(kind), int(index or 0), ""))
    return out or [Device("cpu", 0)]


def _kind(platform: str) -> str:
    platform = platform.lower()
    if platform in ("cuda", "rocm", "gpu", "mps"):
        return "gpu"
    return platform


_TF_DEVICE = re.compile(r"device:([A-Za-z]+):(\d+)", re.IGNORECASE)


def device_of(model: Any) -> Device | None:
    """The device a built model's weights live on, read from the backend's own tensor.

    JAX arrays name their devices (``.devices()``), torch tensors their ``.device``, and
    TensorFlow variables a device string; None when the model has no weights."""
    weights = getattr(model, "weights", None) or []
    if not weights:
        return None
    value = getattr(weights[0], "value", weights[0])
    if hasattr(value, "devices") and callable(value.devices):  # a jax.Array
        try:
            d = sorted(value.devices(), key=lambda x: x.id)[0]
            return Device(_kind(d.platform), int(d.id), str(getattr(d, "device_kind", "")))
        except Exception:  # a tracer or a deleted array: fall back to the device list
            return None
    device = getattr(value, "device", None)
    if device is None:
        return None
    if hasattr(device, "type"):  # a torch.device
        kind = _kind(device.type)
        index = int(device.index or 0)
        label = ""
        if kind == "gpu" and device.type == "cuda":
            import torch

            label = torch.cuda.get_device_name(index)
        return Device(kind, index, label)
    match = _TF_DEVICE.search(str(device))
    if match:
        return Device(_kind(match.group(1)), int(match.group(2)))
    return None


def check_precision(precision: str | None) -> str:
    """Validate a ``--precision`` value; None means float32."""
    value = precision or DEFAULT_PRECISION
    if value not in PRECISIONS:
        raise StudyDefinitionError(
            f"Unknown precision {value!r}: choose one of {', '.join(PRECISIONS)}."
        )
    return value


@contextlib.contextmanager
def precision_policy(precision: str | None) -> Iterator[str]:
    """Build and train under a Keras dtype policy; the previous global policy comes back after.

    ``mixed_float16`` and ``mixed_bfloat16`` compute in 16 bits and keep variables in float32;
    Keras wraps the optimizer of a ``mixed_float16`` model in a ``LossScaleOptimizer`` when it
    compiles.  The model's output layer should be built with ``dtype="float32"`` so that the
    softmax and the loss stay in float32 (the builders in ``searchlab.models`` do this).
    """
    import keras

    value = check_precision(precision)
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(value)
    try:
        yield value
    finally:
        keras.config.set_dtype_policy(before)


def build_for_fit(model: Any, x: Any, y: Any, batch_size: int) -> None:
    """Create a compiled model's optimizer, loss and metric variables before ``fit``.

    On TensorFlow without a distribution strategy, Keras defers creating them to the first
    trace of the train step, and a ``tf.function`` that creates variables is traced a second
    time: about 0.4 s of every trial's first epoch for a small dense net on CPU, a third of a
    trial pruned after one epoch.  On JAX and torch ``fit`` builds them symbolically from a
    batch of its own epoch iterator, which shuffles once more (``np.random``) before the first
    epoch: a model fit again (a pooled suffix, ``searchlab.cache``) would then see other
    batches than a new one from the same seed.  This builds with Keras's own
    ``Trainer._symbolic_build`` from the first ``batch_size`` rows instead (no computation, no
    random numbers drawn), so the train step is traced once and ``fit`` shuffles the same way
    for a new model and a built one.  Where a Keras version lacks that method or the build
    fails, ``fit`` builds as it always did.
    """
    if name() == "tensorflow" and getattr(model, "_distribute_strategy", None) is not None:
        return  # Keras already builds before tracing there
    symbolic_build = getattr(model, "_symbolic_build", None)
    if symbolic_build is None:
        return
    import keras

    try:
        batch = keras.tree.map_structure(lambda a: a[:batch_size], (x, y))
        symbolic_build(data_batch=(batch[0], batch[1], None))
    except Exception as exc:  # fit builds the rest itself, as without this call
        log.debug("could not build the model before fit (%s); fit builds it", exc)


def output_dtype_warning(model: Any, precision: str) -> str | None:
    """A one-line warning when a mixed-precision model's output is not float32, else None."""
    if precision == DEFAULT_PRECISION:
        return None
    try:
        out = model.outputs[0]
        dtype = str(getattr(out, "dtype", ""))
    except Exception:  # a subclassed model has no symbolic outputs: nothing to check
        return None
    if dtype and "float32" not in dtype:
        return (
            f"under {precision} the model's output is {dtype}: build its last layer with "
            "dtype='float32' so the softmax and the loss stay in float32"
        )
    return None


def session_info() -> dict[str, str]:
    """Where a session runs: the backend, its version, Keras's version and the devices seen."""
    backend = name()
    try:
        seen = ", ".join(str(d) for d in devices())
    except Exception as exc:  # report it rather than stop a run over a label
        seen = f"unknown ({type(exc).__name__})"
    return {
        "backend": backend,
        "backend_version": version(backend) or "unknown",
        "keras_version": keras_version() or "unknown",
        "devices": seen,
    }


def run_tags() -> dict[str, str]:
    """Tags for a trial's run: its backend and that backend's version."""
    backend = name()
    return {
        "searchlab.backend": backend,
        "searchlab.backend_version": version(backend) or "unknown",
    }


# -- dropout at a rate held in variables ----------------------------------------------------

#: the backends whose ``keras.random.dropout`` ``dropout_at`` reproduces
DROPOUT_AT = ("tensorflow", "jax")


def dropout_at(inputs: Any, rate: Any, keep: Any, scale: Any, noise_shape: Any, seed: Any) -> Any:
    """``keras.random.dropout(inputs, r, noise_shape, seed)`` for a rate ``r`` given as
    tensors (``rate`` = r, ``keep`` = 1 - r, ``scale`` = 1 / (1 - r), each computed in double
    and rounded, as the backend computes them from a Python float), so the rate can change
    without tracing again: the same uniform draw from ``seed`` and the same arithmetic as
    TensorFlow's ``stateless_dropout`` (keep where u >= r, times the scale) and JAX's
    (``bernoulli``: keep where u < 1 - r, divided by it).  Only for ``DROPOUT_AT``."""
    import keras

    shape = keras.ops.shape(inputs)
    if noise_shape is not None:
        shape = tuple(shape[i] if n is None else n for i, n in enumerate(noise_shape))
    zero = keras.ops.zeros((), inputs.dtype)
    if name() == "jax":  # bernoulli draws in p's type, float32 (a Python float), any inputs
        uniform = keras.random.uniform(shape, seed=seed, dtype="float32")
        return keras.ops.where(uniform < keep, inputs / keras.ops.cast(keep, inputs.dtype), zero)
    uniform = keras.random.uniform(shape, seed=seed, dtype=inputs.dtype)
    scaled = inputs * keras.ops.cast(scale, inputs.dtype)
    return keras.ops.where(uniform >= keras.ops.cast(rate, inputs.dtype), scaled, zero)


# -- fit on arrays in memory ----------------------------------------------------------------


def fit_arrays(
    model: Any,
    x: Any,
    y: Any,
    validation_data: tuple[Any, Any] | None,
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int = 0,
    callbacks: list[Any] | None = None,
) -> None:
    """``model.fit(x, y, validation_data=..., batch_size=..., epochs=..., initial_epoch=...,
    callbacks=..., verbose=0)`` for NumPy arrays, with TensorFlow's per-step cost cut.

    For a small model (a head on cached features) a step is a few small matrix products, and
    on TensorFlow most of its time goes to ``fit``'s input pipeline: every batch passes
    through ``tf.data`` (a permutation, a parallel gather, an optional per step) and every
    ``fit`` builds that pipeline again for the training and the validation arrays.  On
    TensorFlow, without a distribution strategy or XLA, this runs the same ``train_step``
    and ``test_step`` in a loop of its own over the arrays (``_TFLoop``): the same batches in
    the same order (Keras's shuffle, drawn from the same seed), the same steps, metrics,
    callbacks (batch ends every ``steps_per_execution`` steps, as ``fit`` calls them) and
    ``stop_training``, so the weights end bit for bit where ``fit`` leaves them (tested) --
    in about 60% of ``fit``'s time (two epochs of a 256-wide head on 3660 VGG16 features at
    batch 64, 2-core CPU: 0.64 s -> 0.39 s).  Anywhere else it calls ``fit``.
    """
    if not _tf_loop_applies(model, x, y, validation_data):
        model.fit(
            x,
            y,
            validation_data=validation_data,
            batch_size=batch_size,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=0,
        )
        return
    _TFLoop.of(model).fit(
        x,
        y,
        validation_data,
        batch_size=batch_size,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
    )


def predict_arrays(model: Any, x: Any, batch_size: int) -> Any:
    """``model.predict(x, batch_size=batch_size, verbose=0)`` as a NumPy array.

    On TensorFlow (without a distribution strategy) the batches go straight to a traced
    ``model(batch, training=False)`` -- the graph ``predict`` runs, so the same numbers --
    without ``predict``'s ``tf.data`` pipeline: on a 2-core CPU, with that pipeline's threads
    beside the convolutions', one pass in three over VGG16 ran 36% slower (both cores'
    time the same, one of them idle a third of the pass); without it no pass did.
    """
    import numpy as np

    if not _plain_tensorflow(model):
        return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    import tensorflow as tf

    step: Any = getattr(model, "_searchlab_predict_step", None)
    if step is None:  # kept on the model: its next arrays (validation) reuse the trace

        @tf.function(reduce_retracing=True, autograph=False)
        def traced(batch: Any) -> Any:
            return model(batch, training=False)

        step = traced
        object.__setattr__(model, "_searchlab_predict_step", step)  # not a Keras attribute
    data = _sliceable(x)
    outputs = [step(data[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outputs) if outputs else np.asarray(model.predict(x, verbose=0))


def outputs_of(model: Any, x: Any) -> Any:
    """``model.predict(x)`` for a handful of rows (an MLflow signature's example): the model
    called on them once, eagerly, its outputs as NumPy arrays in the same structure, without
    the traced function ``predict`` builds first (for a VGG16, ~0.25 s on a 2-core CPU)."""
    import keras

    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(x, training=False))


def _plain_tensorflow(model: Any) -> bool:
    """On TensorFlow, without a distribution strategy (whose input pipeline ``fit`` and
    ``predict`` must build)."""
    return name() == "tensorflow" and getattr(model, "_distribute_strategy", None) is None


def _tf_loop_applies(model: Any, x: Any, y: Any, validation_data: Any) -> bool:
    import numpy as np

    arrays = [x, y, *(validation_data or ())]
    return (
        _plain_tensorflow(model)
        and getattr(model, "compiled", False)
        and getattr(model.optimizer, "built", False)  # else the first trace creates variables
        and not getattr(model, "run_eagerly", False)
        and not getattr(model, "jit_compile", False)
        and all(isinstance(a, np.ndarray) for a in arrays)
        and (validation_data is None or len(validation_data) == 2)
    )


class _TFLoop:
    """A compiled model's training and evaluation loops as two ``tf.function``s over arrays
    (kept on the model, so a model fit again -- a pooled suffix -- traces them once)."""

    ATTR = "_searchlab_tf_loop"

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.model = model
        self.owner = (
            model.optimizer,
            getattr(model, "_compile_loss", None),
            getattr(model, "_compile_metrics", None),
        )

        # Written as explicit while loops and traced without AutoGraph, as Keras's own
        # train function is: AutoGraph needs this file's source, and a loop it could not
        # convert would fail every trial.
        @tf.function(reduce_retracing=True, autograph=False)
        def train(x: Any, y: Any, order: Any, begin: Any, end: Any, batch_size: Any) -> None:
            # steps [begin, end) of one epoch
            def body(step: Any) -> tuple[Any]:
                rows = order[step * batch_size : (step + 1) * batch_size]
                model.train_step((tf.gather(x, rows), tf.gather(y, rows)))
                return (step + 1,)

            tf.while_loop(lambda step: step < end, body, (begin,))

        @tf.function(reduce_retracing=True, autograph=False)
        def test(x: Any, y: Any, steps: Any, batch_size: Any) -> None:
            def body(step: Any) -> tuple[Any]:
                rows = slice(step * batch_size, (step + 1) * batch_size)
                model.test_step((x[rows], y[rows]))
                return (step + 1,)

            tf.while_loop(lambda step: step < steps, body, (tf.zeros_like(steps),))

        self.train, self.test = train, test

    @classmethod
    def of(cls, model: Any) -> _TFLoop:
        loop = getattr(model, cls.ATTR, None)
        owner = (
            model.optimizer,
            getattr(model, "_compile_loss", None),
            getattr(model, "_compile_metrics", None),
        )
        if loop is None or any(a is not b for a, b in zip(loop.owner, owner, strict=True)):
            loop = cls(model)  # new, or compiled again since: its steps are other functions
            object.__setattr__(model, cls.ATTR, loop)  # not a tracked Keras attribute
        return loop

    def fit(
        self,
        x: Any,
        y: Any,
        validation_data: tuple[Any, Any] | None,
        *,
        batch_size: int,
        epochs: int,
        initial_epoch: int,
        callbacks: list[Any] | None,
    ) -> None:
        import keras
        import tensorflow as tf

        model = self.model
        n = len(x)
        steps = -(-n // batch_size)
        chunk = max(1, int(model.steps_per_execution))
        tensors = [_sliceable(a) for a in (x, y)]
        size = tf.constant(batch_size, tf.int64)
        order = _keras_order(n)  # traced now: the seed is the one fit's own shuffle gets
        val = [_sliceable(a) for a in validation_data] if validation_data is not None else None
        val_rows = len(validation_data[0]) if validation_data is not None else 0
        val_steps = tf.constant(-(-val_rows // batch_size) if val else 0, tf.int64)
        calls = keras.callbacks.CallbackList(
            callbacks,
            add_history=True,
            add_progbar=False,
            verbose=0,
            epochs=epochs,
            steps=steps,
            model=model,
        )
        model.stop_training = False
        calls.on_train_begin()
        epoch_logs: dict[str, Any] | None = None
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            calls.on_epoch_begin(epoch)
            permutation = next(iter(order))  # a new iterator per epoch, as fit's
            for begin in range(0, steps, chunk):
                end = min(begin + chunk, steps)
                calls.on_train_batch_begin(begin)
                self.train(
                    *tensors,
                    permutation,
                    tf.constant(begin, tf.int64),
                    tf.constant(end, tf.int64),
                    size,
                )
                # fit's iterator says every chunk ends chunk steps on, the last one too
                calls.on_train_batch_end(begin + chunk - 1, model.get_metrics_result())
                if model.stop_training:
                    break
            epoch_logs = dict(model.get_metrics_result())
            if val is not None:
                calls.on_test_begin()
                model.reset_metrics()
                self.test(*val, val_steps, size)
                val_logs = model.get_metrics_result()
                calls.on_test_end(val_logs)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            calls.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        if epochs > 0:  # as fit: an optimizer with an EMA writes it into the weights
            model.optimizer.finalize_variable_values(model.trainable_weights)
        calls.on_train_end(logs=epoch_logs)


def _sliceable(array: Any) -> Any:
    """An array as ``fit``'s adapter feeds it: floats in Keras's float type, as a tensor."""
    import keras
    import numpy as np
    import tensorflow as tf

    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.dtype(keras.config.floatx()):
        array = array.astype(keras.config.floatx())
    return tf.convert_to_tensor(array)


def _keras_order(n: int) -> Any:
    """A dataset of one element, the order in which ``fit`` visits ``n`` shuffled rows.

    Keras's array adapter (``ArrayDataAdapter.get_tf_dataset``) draws its permutation in this
    very function, mapped over ``Dataset.range(1)``: a random op's seed in a traced function
    is the global seed and the op's position in that function, so the same function body
    traced after the same ``keras.utils.set_random_seed`` draws the same permutation, and
    each new iterator draws it again as each of ``fit``'s epochs does.  A Keras version that
    shuffles otherwise fails ``tests/test_backend.py``'s comparison with ``fit``.
    """
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert  # nothing to convert; needs no source
    def permutation(_: Any) -> Any:
        indices = tf.range(n, dtype=tf.int64)
        indices = tf.random.shuffle(indices)
        return indices

    return tf.data.Dataset.range(1).map(permutation).prefetch(1)


def is_random(layer: Any) -> bool:
    """Whether a Keras layer may act randomly (it holds a seed generator, or it is user
    code); a nested model (a backbone inside a user's ``Sequential``) when any of its layers
    may.  Here, below both ``models`` and ``training.cache``, which ask it."""
    import keras

    if isinstance(layer, keras.layers.Lambda):  # user code: it may be random
        return True
    if isinstance(layer, keras.Model) and any(is_random(inner) for inner in layer.layers):
        return True
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())
