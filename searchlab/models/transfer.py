"""Transfer models: a pretrained backbone, its first N layers frozen, and a new head.

The backbone is a ``keras.applications`` model by name (``vgg16``, ``vgg19``, ``resnet50``,
``mobilenet_v2``) without its top, or a Keras model file of your own (``.h5`` / ``.keras``) cut
at a named layer or just before its classifier.  The complete model takes raw images::

    raw images -> [Resizing] -> the backbone's own preprocessing -> backbone -> head
    head: pooling (avg | max) or flatten -> Dense(head_width) -> Dropout -> Dense(classes)

All of it is built from stock Keras layers, so an exported ``.h5`` loads with plain
``keras.models.load_model``.  Searched params (all optional): ``frozen_layers`` (the first N
backbone layers are frozen; default all of them), ``head_width`` (256), ``dropout`` (0.0),
``learning_rate`` (1e-3), ``batch_size``.  With a ``FineTune`` schedule the trial first trains
the head with the whole backbone frozen, then unfreezes down to layer ``frozen_layers`` and
trains on at a smaller learning rate (params ``head_epochs``, ``fine_tune_epochs``,
``lr_factor`` override the schedule's values).

``Transfer`` is a ``cache.TransferBuilder``: that protocol's docstring says what a trial and
the feature cache call, in which order.  A trial trained on the feature cache uses
``build_suffix`` instead of building the complete model: only the layers after the frozen
prefix, copied from a complete model built once per process (``searchlab.cache``).  Its
head's Dropout keeps the rate in a variable (``VariableRateDropout``), so later trials of the
same structure (``suffix_key``) can train the same compiled suffix once ``reset_suffix`` has put
it back where ``build_suffix`` would start a new one.

ImageNet weights (``weights="imagenet"``) are looked for, in order: in the data directory
under Keras's own file name, in Keras's cache (``~/.keras/models``), then downloaded by Keras.
``weights=None`` gives a random backbone that is the same in every trial and process (seeded
from ``seed``), and ``weights="path.h5"`` loads your file.

Example:
    >>> vgg = Transfer("vgg16", weights="imagenet", pooling="avg")
    >>> study = Study(name="cifar-vgg", space={"frozen_layers": Int(10, 18)}, model=vgg, ...)
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from searchlab import backend, config
from searchlab import data as data_mod
from searchlab.backend import is_random
from searchlab.data import DataInfo
from searchlab.errors import SpaceError, StudyDefinitionError

#: name -> (keras.applications constructor name, preprocessing mode, notop weights file)
BACKBONES: dict[str, tuple[str, str, str]] = {
    "vgg16": ("VGG16", "caffe", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg19": ("VGG19", "caffe", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": ("ResNet50", "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "mobilenet_v2": ("MobileNetV2", "tf", ""),  # file name depends on the input size
}
#: where keras.applications downloads a backbone's ImageNet weights from: its folder there
_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/{}/{}"
_WEIGHTS_FOLDER = {"vgg16": "vgg16", "vgg19": "vgg19", "resnet50": "resnet"}
PREPROCESS = ("caffe", "tf", "torch", "none")
POOLINGS = ("avg", "max", "flatten")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONE_PREFIX = "_searchlab_backbone"
#: a backbone layer's position in the backbone (``frozen_layers`` counts these)
BACKBONE_INDEX = "_searchlab_backbone_index"
#: on a model: how many layers its backbone has (a suffix model holds only the last ones)
BACKBONE_SIZE = "_searchlab_backbone_size"
#: on a suffix model: its layers that compute their convolution as a matrix product
MATMUL_CONVS = "_searchlab_matmul_convs"


@dataclass(frozen=True)
class FineTune:
    """Two-phase schedule: ``head_epochs`` with the whole backbone frozen (on the feature
    cache), then ``epochs`` more with the layers from ``frozen_layers`` on unfrozen, at the
    learning rate times ``lr_factor``.  ``epochs=None`` takes the study's epochs."""

    head_epochs: int = 1
    epochs: int | None = None
    lr_factor: float = 0.1

    def resolve(self, params: Mapping[str, Any], study_epochs: int) -> tuple[int, int, float]:
        e1 = int(params.get("head_epochs", self.head_epochs))
        e2 = params.get("fine_tune_epochs", self.epochs)
        e2 = study_epochs if e2 is None else int(e2)
        f = float(params.get("lr_factor", self.lr_factor))
        if e1 < 0 or e2 < 0 or e1 + e2 < 1:
            raise SpaceError(
                f"FineTune: head_epochs and fine_tune_epochs must be >= 0 with at least one "
                f"epoch in all, but got head_epochs={e1}, fine_tune_epochs={e2}."
            )
        if not f > 0:
            raise SpaceError(f"FineTune: lr_factor must be > 0, but got {f}.")
        return e1, e2, f


class Transfer:
    """A model builder ``build(params, info)`` for backbone + new head (see the module doc);
    it implements ``cache.TransferBuilder``.

    Args:
        backbone: ``vgg16``, ``vgg19``, ``resnet50``, ``mobilenet_v2``, or the path of a saved
            Keras model (``.h5`` / ``.keras``).
        weights: ``"imagenet"``, None (a fixed random backbone) or a weights file path; for a
            model file its own weights are used and this must stay ``"imagenet"`` or None.
        cut: for a model file, the name of its last layer to keep (default: all layers but the
            last, i.e. cut just before its classifier).
        input_size: resize images to this square size first (e.g. 64 or 224 to upsample
            CIFAR-10's 32x32); None keeps the data's size.
        pooling: ``avg``, ``max`` or ``flatten`` between backbone and head.
        preprocess: ``auto`` (the backbone's own: caffe for VGG/ResNet, tf for MobileNetV2,
            none for a model file), or ``caffe``, ``tf``, ``torch``, ``none``.
        cache: reuse the frozen prefix's outputs across epochs and trials (the feature cache).
        fine_tune: a ``FineTune`` schedule for two-phase training, or None.
        seed: seeds the random backbone when ``weights=None``.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
    """

    feature_cache: bool
    #: grid search runs the points that share a cut point together (one cache entry at a time)
    group_by = "frozen_layers"

    def __init__(
        self,
        backbone: str = "vgg16",
        *,
        weights: str | os.PathLike[str] | None = "imagenet",
        cut: str | None = None,
        input_size: int | None = None,
        pooling: str = "avg",
        preprocess: str = "auto",
        cache: bool = True,
        fine_tune: FineTune | None = None,
        seed: int = 0,
        optimizer: str = "adam",
    ) -> None:
        self.backbone = str(backbone)
        self.is_file = self.backbone.endswith((".h5", ".keras")) or os.sep in self.backbone
        if not self.is_file and self.backbone not in BACKBONES:
            raise StudyDefinitionError(
                f"Unknown backbone {self.backbone!r}: use one of {', '.join(BACKBONES)}, or the "
                "path of a saved Keras model (.h5 or .keras)."
            )
        if pooling not in POOLINGS:
            raise StudyDefinitionError(
                f"pooling must be one of {', '.join(POOLINGS)}, but got {pooling!r}."
            )
        if preprocess != "auto" and preprocess not in PREPROCESS:
            raise StudyDefinitionError(
                f"preprocess must be 'auto' or one of {', '.join(PREPROCESS)}, got {preprocess!r}."
            )
        if input_size is not None and (not isinstance(input_size, int) or input_size < 8):
            raise StudyDefinitionError(
                f"input_size must be an int >= 8 or None, got {input_size!r}."
            )
        if optimizer not in ("adam", "sgd"):
            raise StudyDefinitionError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
        if self.is_file and weights not in ("imagenet", None):
            raise StudyDefinitionError(
                "A backbone model file brings its own weights: leave weights= unset."
            )
        if fine_tune is not None and not isinstance(fine_tune, FineTune):
            raise StudyDefinitionError("fine_tune must be a FineTune(...) schedule or None.")
        self.weights = None if weights is None else str(weights)
        #: the ``searchlab.setting`` (environment variable) the study file took them from
        self.weights_setting = config.setting_for(self.weights)
        #: rebuilt as a stored study trained it (``as_trained``): export, not a run
        self.trained = False
        self.cut = cut
        self.input_size = input_size
        self.pooling = pooling
        self.preprocess = preprocess
        self.feature_cache = bool(cache)
        self.fine_tune = fine_tune
        self.seed = int(seed)
        self.optimizer = optimizer
        self.__name__ = f"transfer_{Path(self.backbone).stem}"

    def settings(self) -> dict[str, str]:
        """What of this builder changes a trial's results, by name (the session's parent run
        logs them as ``model.*`` params; resuming a study with other values is refused)."""
        weights = self.weights if self.weights is not None else f"random (seed {self.seed})"
        return {
            "backbone": self.backbone,
            "weights": "its own" if self.is_file else weights,
            "input_size": str(self.input_size or "the data's"),
            "pooling": self.pooling,
            "preprocess": self.preprocess,
            "optimizer": self.optimizer,
            "fine_tune": repr(self.fine_tune) if self.fine_tune is not None else "none",
        }

    def as_trained(self, settings: Mapping[str, str]) -> Transfer:
        """This builder with the backbone weights a stored study trained with: ``settings``
        are its ``settings()`` as the session recorded them.  A study file whose weights come
        from an environment variable (``searchlab.setting``) then exports and reports the
        model it trained without that variable set again; a missing ImageNet file is then
        named as what the trained model's frozen backbone is rebuilt from."""
        was = settings.get("weights")
        if was is None or self.is_file:
            return self
        twin = copy.copy(self)
        twin.trained, twin.weights_setting = True, None
        random_seed = re.fullmatch(r"random \(seed (-?\d+)\)", was)
        if random_seed:
            twin.weights, twin.seed = None, int(random_seed.group(1))
        else:
            twin.weights = was
        return twin

    def fetch_weights(self, input_shape: tuple[int, ...]) -> Path | None:
        """The backbone's weights file, found before a session writes anything: a user's
        file (it must exist), or for ``weights="imagenet"`` Keras's file in the data
        directory or Keras's cache, downloaded into Keras's cache where it is in neither.
        None for a random backbone or a model file.  Raises ``StudyDefinitionError``, one
        line naming the fix in the study's own terms (the ``searchlab.setting`` environment
        variable that gave the value, where one did), when the file cannot be had."""
        if self.is_file or self.weights is None:
            return None
        shape = (self.input_size, self.input_size, 3) if self.input_size else tuple(input_shape)
        path = resolve_weights(self.backbone, self.weights, shape, self.weights_setting)
        if path is not None:
            return path
        fname = weights_file_name(self.backbone, shape)
        url = _WEIGHTS_URL.format(_WEIGHTS_FOLDER.get(self.backbone, self.backbone), fname)
        try:
            return Path(keras.utils.get_file(fname, url, cache_subdir="models"))
        except Exception as exc:
            raise _missing_weights(self.backbone, shape, exc, self) from None

    def __repr__(self) -> str:
        return (
            f"Transfer({self.backbone!r}, weights={self.weights!r}, pooling={self.pooling!r}, "
            f"input_size={self.input_size!r}, cache={self.feature_cache})"
        )

    # -- building ---------------------------------------------------------------------------

    def __call__(self, params: Mapping[str, Any], info: DataInfo) -> keras.Model:
        """Build and compile the complete model for ``params``."""
        model, n_backbone = self.build_uncompiled(params, info)
        frozen = self.frozen_count(params, n_backbone)
        if self.fine_tune is not None:
            frozen_now = n_backbone if self.fine_tune.resolve(params, 1)[0] > 0 else frozen
        else:
            frozen_now = frozen
        self.freeze(model, frozen_now)
        self.compile(model, params)
        return model

    def build_uncompiled(
        self, params: Mapping[str, Any], info: DataInfo
    ) -> tuple[keras.Model, int]:
        head_seed = _draw_seed()  # first: the head is the same in the full and suffix models
        inputs, features, n_backbone = (
            self._file_backbone(info) if self.is_file else self._app_backbone(info)
        )
        tag = self._head_tag(inputs, features)
        pooled = self._pool(features, tag)
        outputs = self._head(pooled, params, info, tag, head_seed)
        model = keras.Model(inputs, outputs, name=self.__name__)
        setattr(model, BACKBONE_SIZE, n_backbone)
        return model, n_backbone

    def template_key(self, info: DataInfo) -> tuple:
        """What the complete model's layers before the head depend on: two builders with the
        same key build the same backbone (a per-process template is shared by this key)."""
        mtime = None
        if self.is_file:
            path = Path(self.backbone).expanduser()
            mtime = path.stat().st_mtime if path.is_file() else None
        elif self.weights not in (None, "imagenet") and Path(self.weights).expanduser().is_file():
            mtime = Path(self.weights).expanduser().stat().st_mtime
        return (
            self.backbone,
            self.weights,
            mtime,
            self.cut,
            self.input_size,
            self.pooling,
            self.preprocess,
            self.seed,
            tuple(info.input_shape),
            info.num_classes,
        )

    def build_suffix(
        self, params: Mapping[str, Any], info: DataInfo, template: keras.Model, cut: Any
    ) -> keras.Model:
        """The part of the complete model after ``cut`` (a ``cache.Cut`` on ``template``, a
        complete model this builder built), taking the cut's features: the backbone layers
        after the cut are copied from ``template`` (configs and weights), the head is new.

        Its layers have the names, and after training the weights, of the same layers of the
        complete model, and it draws the same head initialization: trained on the features,
        it ends where the complete model trained on raw images ends.  Building it skips
        creating and loading the backbone.
        """
        head_seed = _draw_seed()
        tag = self._template_tag(template)
        pooled = template.get_layer(f"head_pool{tag}").output
        inputs = keras.Input(shape=cut.shape, name=f"{cut.name}_features")
        x = inputs
        n_backbone = getattr(template, BACKBONE_SIZE)
        if cut.name != f"head_pool{tag}":
            part = keras.Model(cut.tensor, pooled)
            matmul = _small_maps_by_matmul()
            # Cloning draws seeds from `random` for initializers whose values the template's
            # weights replace: keep them out of the stream, so that building a suffix draws
            # the head's seed only, as `reset_suffix` does.
            state = random.getstate()
            copy = keras.models.clone_model(
                part,
                input_tensors=inputs,
                clone_function=lambda layer: _clone_for_training(layer, matmul),
            )
            random.setstate(state)
            for layer in part.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                new = copy.get_layer(layer.name)
                if layer.weights:
                    new.set_weights(layer.get_weights())
                if getattr(layer, BACKBONE_PREFIX, False):
                    setattr(new, BACKBONE_PREFIX, True)
                    setattr(new, BACKBONE_INDEX, getattr(layer, BACKBONE_INDEX))
            x = copy.outputs[0]
        dropout = (
            VariableRateDropout if VariableRateDropout.matches_backend() else keras.layers.Dropout
        )
        outputs = self._head(x, params, info, tag, head_seed, dropout=dropout)
        model = keras.Model(inputs, outputs, name=self.__name__)
        setattr(model, BACKBONE_SIZE, n_backbone)
        setattr(
            model,
            MATMUL_CONVS,
            [layer.name for layer in model.layers if isinstance(layer, MatmulConv2D)],
        )
        return model

    def suffix_key(
        self, params: Mapping[str, Any], info: DataInfo, template: keras.Model, cut: Any
    ) -> tuple | None:
        """What the structure of ``build_suffix(params, info, template, cut)`` depends on
        besides the template and the cut: suffixes with equal keys have the same layers and
        optimizer, and ``reset_suffix`` turns one into the other.  The learning rate, dropout
        rate and batch size are not in it: they are variables, or the traced step takes any.
        None when a backbone layer after the cut may act randomly (``cache.is_random``): only
        building it again would draw the same way."""
        if not VariableRateDropout.matches_backend():  # the rate is a constant of the trace
            return None
        after = template.layers[cut.index + 1 :]
        if any(is_random(layer) for layer in after if getattr(layer, BACKBONE_PREFIX, False)):
            return None
        matmul = MATMUL_CONV_MAX_POSITIONS if _small_maps_by_matmul() else 0
        return (
            type(self).__qualname__,
            self.template_key(info),
            cut.index,
            cut.name,
            int(params.get("head_width", 256)),
            self.optimizer,
            matmul,
        )

    def reset_suffix(
        self, model: keras.Model, params: Mapping[str, Any], template: keras.Model
    ) -> None:
        """Put ``model`` (a ``build_suffix`` model of the same ``suffix_key``, trained since)
        where ``build_suffix(params, ...)`` would start a new one: the backbone layers hold the
        template's weights again, the head is drawn from the seed that ``build_suffix`` would
        draw (its only draw from ``random``, made first here too), biases are zero, and the
        dropout has the params' rate and a new seed stream."""
        head_seed = _draw_seed()
        for layer in model.layers:
            if getattr(layer, BACKBONE_PREFIX, False) and layer.weights:
                layer.set_weights(template.get_layer(layer.name).get_weights())
        tag = self._template_tag(template)
        dense_seed, dropout_seed, classes_seed = _head_seeds(head_seed)
        for name, seed in ((f"head_dense{tag}", dense_seed), (f"classes{tag}", classes_seed)):
            layer = model.get_layer(name)
            kernel, bias = layer.kernel, layer.bias
            kernel.assign(_kernel_initializer(seed)(kernel.shape, dtype=kernel.dtype))
            bias.assign(keras.ops.zeros(bias.shape, dtype=bias.dtype))
        dropout = model.get_layer(f"head_dropout{tag}")
        dropout.restart(float(params.get("dropout", 0.0)), seed=dropout_seed)

    def _head_tag(self, inputs: Any, features: Any) -> str:
        taken = {layer.name for layer in keras.Model(inputs, features).layers}
        n = 0
        while {f"head_pool{self._tag(n)}", f"classes{self._tag(n)}"} & taken:
            n += 1  # a backbone that was itself built here: give the new head new names
        return self._tag(n)

    @staticmethod
    def _template_tag(model: keras.Model) -> str:
        """The head's name suffix in a complete model built here: its last layer's."""
        name = model.layers[-1].name
        return name[len("classes") :]

    def _pool(self, features: Any, tag: str) -> Any:
        if len(features.shape) == 4:
            pool = {
                "avg": keras.layers.GlobalAveragePooling2D,
                "max": keras.layers.GlobalMaxPooling2D,
                "flatten": keras.layers.Flatten,
            }[self.pooling]
            return pool(name=f"head_pool{tag}")(features)
        return keras.layers.Flatten(name=f"head_pool{tag}")(features)

    @staticmethod
    def _head(
        x: Any,
        params: Mapping[str, Any],
        info: DataInfo,
        tag: str,
        seed: int,
        dropout: type[keras.layers.Dropout] = keras.layers.Dropout,
    ) -> Any:
        """Dense -> Dropout -> Dense(classes), seeded from ``seed`` alone."""
        dense_seed, dropout_seed, classes_seed = _head_seeds(seed)
        x = keras.layers.Dense(
            int(params.get("head_width", 256)),
            activation="relu",
            name=f"head_dense{tag}",
            kernel_initializer=_kernel_initializer(dense_seed),
        )(x)
        x = dropout(
            float(params.get("dropout", 0.0)), seed=dropout_seed, name=f"head_dropout{tag}"
        )(x)
        return keras.layers.Dense(  # float32 also under a mixed precision policy
            info.num_classes,
            activation="softmax",
            dtype="float32",
            name=f"classes{tag}",
            kernel_initializer=_kernel_initializer(classes_seed),
        )(x)

    @staticmethod
    def _tag(n: int) -> str:
        return f"_{n}" if n else ""

    def frozen_count(self, params: Mapping[str, Any], n_backbone: int) -> int:
        """``frozen_layers`` from params (default: the whole backbone), checked."""
        value = params.get("frozen_layers", n_backbone)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n_backbone:
            raise SpaceError(
                f"frozen_layers={value!r} is out of range for backbone {self.backbone}: it has "
                f"{n_backbone} layers, so frozen_layers must be an int in [0, {n_backbone}]. "
                f"Narrow the space, e.g. Int(0, {n_backbone})."
            )
        return value

    @staticmethod
    def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
        return [layer for layer in model.layers if getattr(layer, BACKBONE_PREFIX, False)]

    @classmethod
    def backbone_size(cls, model: keras.Model) -> int:
        """The backbone's layer count (also for a suffix model, which holds only its end)."""
        size = getattr(model, BACKBONE_SIZE, None)
        return len(cls.backbone_layers(model)) if size is None else int(size)

    def freeze(self, model: keras.Model, frozen: int) -> None:
        """Freeze the first ``frozen`` backbone layers; the rest of the backbone and the head
        train.  Frozen BatchNorm layers run in inference mode (Keras 3)."""
        for i, layer in enumerate(self.backbone_layers(model)):
            layer.trainable = getattr(layer, BACKBONE_INDEX, i) >= frozen

    @staticmethod
    def learning_rate(params: Mapping[str, Any], lr_factor: float = 1.0) -> float:
        return float(params.get("learning_rate", 1e-3)) * lr_factor

    def compile(
        self, model: keras.Model, params: Mapping[str, Any], lr_factor: float = 1.0
    ) -> None:
        lr = self.learning_rate(params, lr_factor)
        optimizer = (
            keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
            if self.optimizer == "sgd"
            else keras.optimizers.Adam(learning_rate=lr)
        )
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )

    def schedule(
        self, params: Mapping[str, Any], model: keras.Model, study_epochs: int
    ) -> list[tuple[int, int, float]]:
        """The trial's phases as (epochs, frozen backbone layers, learning-rate factor)."""
        n_backbone = self.backbone_size(model)
        frozen = self.frozen_count(params, n_backbone)
        if self.fine_tune is None:
            return [(study_epochs, frozen, 1.0)]
        e1, e2, factor = self.fine_tune.resolve(params, study_epochs)
        phases = []
        if e1:
            phases.append((e1, n_backbone, 1.0))
        if e2:
            phases.append((e2, frozen, factor))
        return phases

    def _preprocessing(self, x: Any, mode: str) -> Any:
        if mode == "caffe":  # RGB -> BGR, minus the ImageNet mean: a fixed 1x1 convolution
            kernel = np.zeros((1, 1, 3, 3), dtype="float32")
            for out_c, in_c in enumerate((2, 1, 0)):
                kernel[0, 0, in_c, out_c] = 1.0
            layer = keras.layers.Conv2D(3, 1, name="preprocess_caffe", trainable=False)
            x = layer(x)
            layer.set_weights([kernel, -np.array(_CAFFE_MEAN_BGR, dtype="float32")])
            return x
        if mode == "tf":
            return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")(x)
        if mode == "torch":
            x = keras.layers.Rescaling(1.0 / 255.0, name="preprocess_torch_scale")(x)
            return keras.layers.Normalization(
                mean=list(_TORCH_MEAN),
                variance=[s * s for s in _TORCH_STD],
                name="preprocess_torch",
            )(x)
        return x

    def _app_backbone(self, info: DataInfo) -> tuple[Any, Any, int]:
        ctor_name, mode, _ = BACKBONES[self.backbone]
        shape = tuple(info.input_shape)
        if len(shape) != 3 or shape[-1] != 3:
            raise StudyDefinitionError(
                f"Backbone {self.backbone} needs RGB images (height, width, 3), but the data "
                f"has shape {shape}. Use a colour dataset or a backbone model file of your own."
            )
        inputs = keras.Input(shape=shape, name="images")
        x = inputs
        size = shape[:2]
        if self.input_size is not None and tuple(size) != (self.input_size,) * 2:
            size = (self.input_size, self.input_size)
            x = keras.layers.Resizing(*size, name="resize")(x)
        x = self._preprocessing(x, mode if self.preprocess == "auto" else self.preprocess)
        ctor = getattr(keras.applications, ctor_name)
        try:
            app = ctor(include_top=False, weights=None, input_tensor=x)
        except ValueError as exc:
            raise StudyDefinitionError(
                f"Backbone {self.backbone} cannot take {size[0]}x{size[1]} images ({exc}). "
                "Set input_size= to a size it accepts (e.g. 32 or more for VGG16)."
            ) from None
        layers = [layer for layer in app.layers if not isinstance(layer, keras.layers.InputLayer)]
        known = {id(layer) for layer in _layers_up_to(inputs, x)}
        layers = [layer for layer in layers if id(layer) not in known]
        for i, layer in enumerate(layers):
            setattr(layer, BACKBONE_PREFIX, True)
            setattr(layer, BACKBONE_INDEX, i)
        arrays = _backbone_arrays(self, tuple(size) + (3,), layers)
        for layer, values in zip(layers, arrays, strict=True):
            if values:
                layer.set_weights(values)
        return inputs, app.output, len(layers)

    def _file_backbone(self, info: DataInfo) -> tuple[Any, Any, int]:
        path = Path(self.backbone).expanduser()
        if not path.is_file():
            raise StudyDefinitionError(
                f"Backbone model file {path} not found. Give the path of a model saved with "
                "model.save('name.h5') or model.save('name.keras')."
            )
        try:
            loaded = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise StudyDefinitionError(
                f"Cannot load backbone model file {path} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})."
            ) from exc
        layers = [
            layer for layer in loaded.layers if not isinstance(layer, keras.layers.InputLayer)
        ]
        names = [layer.name for layer in layers]
        if self.cut is None:
            if len(layers) < 2:
                raise StudyDefinitionError(
                    f"Backbone model {path} has {len(layers)} layer(s): nothing is left once its "
                    "classifier is cut off. Pass cut='LAYER_NAME'."
                )
            keep = len(layers) - 1
        elif self.cut in names:
            keep = names.index(self.cut) + 1
        else:
            raise StudyDefinitionError(
                f"Backbone model {path} has no layer named {self.cut!r}; its layers are "
                f"{', '.join(names)}."
            )
        expected = tuple(loaded.inputs[0].shape[1:])
        if tuple(info.input_shape) != expected:
            raise StudyDefinitionError(
                f"Backbone model {path} takes inputs of shape {expected}, but the data has "
                f"shape {tuple(info.input_shape)}. Use data of the shape the model was trained on."
            )
        for i, layer in enumerate(layers[:keep]):
            setattr(layer, BACKBONE_PREFIX, True)
            setattr(layer, BACKBONE_INDEX, i)
        x = layers[keep - 1].output
        mode = "none" if self.preprocess == "auto" else self.preprocess
        if mode != "none":
            raise StudyDefinitionError(
                "preprocess= applies to keras.applications backbones; a model file keeps its own."
            )
        return loaded.inputs[0], x, keep


class MatmulConv2D(keras.layers.Conv2D):
    """``Conv2D`` (stride 1, no dilation, one group) computed as one matrix product over
    the image patches (im2col) instead of the backend's convolution kernel.

    Same config, same weights, same result up to float rounding.  It exists for training
    on a CPU: there TensorFlow's gradient of a 3x3 convolution with respect to its input
    takes about 150 ms for a batch of 32 2x2x512 maps -- thirty times its forward pass --
    and that is most of the cost of fine-tuning VGG16's block5 on 32x32 images (also in a
    plain Keras model; JAX on CPU is slower still).  As a matrix product both directions
    run at the speed of the forward pass.  Only models that train on cached features use
    it (``Transfer.build_suffix``); the complete model and exports keep ``Conv2D``.
    """

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        ops = keras.ops
        kh, kw, c_in, c_out = kernel.shape
        if self.padding == "same":
            top, left = (kh - 1) // 2, (kw - 1) // 2
            inputs = ops.pad(inputs, [[0, 0], [top, kh - 1 - top], [left, kw - 1 - left], [0, 0]])
        rows, cols = inputs.shape[1] - kh + 1, inputs.shape[2] - kw + 1
        patches = ops.concatenate(
            [inputs[:, i : i + rows, j : j + cols, :] for i in range(kh) for j in range(kw)],
            axis=-1,
        )
        flat = ops.reshape(patches, (-1, kh * kw * c_in))
        out = ops.matmul(flat, ops.reshape(kernel, (kh * kw * c_in, c_out)))
        return ops.reshape(out, (-1, rows, cols, c_out))


#: MatmulConv2D is used for maps of at most this many positions (measured on a 2-core CPU,
#: TensorFlow, batch 32, two 3x3 convolutions: 4x faster at 2x2x512, 2x at 4x4x512, slower
#: from 8x8x256 on, where the backend's own kernel is efficient)
MATMUL_CONV_MAX_POSITIONS = 16


def _clone_for_training(layer: Any, matmul: bool) -> Any:
    """A layer's copy for a model that trains on cached features (``build_suffix``)."""
    if matmul and _matmul_conv_fits(layer):
        return MatmulConv2D.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def _matmul_conv_fits(layer: Any) -> bool:
    if type(layer) is not keras.layers.Conv2D:
        return False
    shape = layer.input.shape if hasattr(layer, "input") else None
    return (
        shape is not None
        and None not in shape[1:3]
        and shape[1] * shape[2] <= MATMUL_CONV_MAX_POSITIONS
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("same", "valid")
    )


def _small_maps_by_matmul() -> bool:
    """Whether small convolutions train as matrix products here: on a CPU only (a GPU's
    convolution kernels are fast in both directions)."""
    try:
        return backend.devices()[0].kind == "cpu"
    except Exception:  # a backend that cannot list devices: keep its own kernels
        return False


def _draw_seed() -> int:
    """A seed for the head's initializers and dropout, drawn from Python's ``random`` (which
    ``keras.utils.set_random_seed`` seeds), so a trial's head does not depend on how many
    backbone layers were created before it."""
    return random.randint(0, 2**30)


def _head_seeds(seed: int) -> tuple[int, int, int]:
    """The seeds of the head's Dense kernel, Dropout and classifier kernel."""
    return seed, seed + 1, seed + 2


def _kernel_initializer(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.GlorotUniform(seed=seed)


@dataclass(frozen=True)
class _Untracked:
    """Holds a variable out of sight of Keras's attribute tracking (it is no weight)."""

    variable: Any


class VariableRateDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose rate is a variable: for training suffix models only.

    A stock ``Dropout`` keeps its rate as a Python float, which a traced train step holds as a
    constant; with the rate in a variable, one compiled suffix model trains trials of every
    dropout rate (``restart`` sets it, and the seed).  It drops what ``Dropout(rate,
    seed=seed)`` drops, number for number, on the backends whose dropout it copies
    (``matches_backend``: TensorFlow keeps ``uniform >= rate`` and scales by ``1 / (1 - rate)``,
    JAX keeps ``uniform < 1 - rate`` and divides by ``1 - rate``, from the same seed stream),
    and like it has no weights: a suffix's weights file maps onto the complete model's stock
    layer.  The rate is in ``variables`` (as a seed generator's state is), so a backend that
    passes state into its traced step (JAX) reads its current value.
    """

    BACKENDS = ("tensorflow", "jax")

    @classmethod
    def matches_backend(cls) -> bool:
        return keras.backend.backend() in cls.BACKENDS

    def __init__(self, rate: float, *, seed: int, name: str) -> None:
        super().__init__(rate, seed=seed, name=name)
        self._rate = _Untracked(
            keras.Variable(
                [0.0, 1.0, 1.0, 1.0], dtype=self.compute_dtype, trainable=False, name="rate"
            )
        )
        self._set_rate(rate)

    def build(self, input_shape: Any) -> None:
        if getattr(self, "seed_generator", None) is None:  # Dropout makes one for rate > 0 only
            self.seed_generator = keras.random.SeedGenerator(self.seed)

    @property
    def variables(self) -> list[Any]:
        return [*super().variables, self._rate.variable]

    def restart(self, rate: float, seed: int) -> None:
        """Drop out as a new ``VariableRateDropout(rate, seed=seed)`` would."""
        self._set_rate(rate)
        self.seed = seed
        self.seed_generator.state.assign([seed, 0])  # what a new SeedGenerator(seed) holds

    def _set_rate(self, rate: float) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"The dropout rate must be in [0, 1], but got {rate}.")
        self.rate = rate
        scale = 1 / (1 - rate) if rate < 1 else 0.0  # a rate of 1 drops everything
        keep = 1 - rate  # the divisor stays 1 where nothing is kept
        self._rate.variable.assign([rate, scale, keep, keep if rate < 1 else 1.0])

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training:
            return inputs
        values = keras.ops.cast(self._rate.variable, inputs.dtype)
        noise = keras.random.uniform(
            keras.ops.shape(inputs), dtype=inputs.dtype, seed=self.seed_generator
        )
        if keras.backend.backend() == "jax":  # jax.random.bernoulli(key, 1 - rate)
            return keras.ops.where(
                noise < values[2], inputs / values[3], keras.ops.zeros_like(inputs)
            )
        return keras.ops.where(noise >= values[0], inputs * values[1], keras.ops.zeros_like(inputs))


def _layers_up_to(inputs: Any, tensor: Any) -> list[Any]:
    """The layers between ``inputs`` and ``tensor`` (our resize/preprocess layers)."""
    if tensor is inputs:
        return []
    return list(keras.Model(inputs, tensor).layers)


#: per process: the backbone's weights, so each trial does not read the file again
_ARRAYS: dict[tuple, list[list[np.ndarray]]] = {}


def _backbone_arrays(
    spec: Transfer, shape: tuple[int, ...], layers: list[Any]
) -> list[list[np.ndarray]]:
    if spec.weights is None:
        key: tuple = (spec.backbone, None, spec.seed, shape)
        if key not in _ARRAYS:
            _ARRAYS.clear()
            _ARRAYS[key] = [_seeded(layer, spec.seed) for layer in layers]
        return _ARRAYS[key]
    path = resolve_weights(spec.backbone, spec.weights, shape, spec.weights_setting)
    key = (spec.backbone, str(path), os.path.getmtime(path) if path else None, shape)
    if key not in _ARRAYS:
        ctor = getattr(keras.applications, BACKBONES[spec.backbone][0])
        try:
            source = ctor(
                include_top=False, weights=str(path) if path else "imagenet", input_shape=shape
            )
        except Exception as exc:
            if path is None:
                raise _missing_weights(spec.backbone, shape, exc, spec) from exc
            raise StudyDefinitionError(
                f"Cannot load backbone weights {path} into {spec.backbone} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Use the notop weights file "
                f"for {spec.backbone}."
            ) from exc
        src = [layer for layer in source.layers if not isinstance(layer, keras.layers.InputLayer)]
        _ARRAYS.clear()
        _ARRAYS[key] = [layer.get_weights() for layer in src]
        del source
    return _ARRAYS[key]


def _seeded(layer: Any, seed: int) -> list[np.ndarray]:
    """Deterministic Glorot-uniform kernels (the same in every process); other variables
    keep their constant initial values (zero biases, BatchNorm's 1/0)."""
    out = []
    for i, w in enumerate(layer.get_weights()):
        if w.ndim >= 2:
            digest = hashlib.sha1(f"{seed}/{layer.name}/{i}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            fan_in = int(np.prod(w.shape[:-1]))
            fan_out = int(np.prod(w.shape[:-2])) * w.shape[-1] if w.ndim == 4 else w.shape[-1]
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, size=w.shape).astype(w.dtype)
        out.append(w)
    return out


def weights_file_name(backbone: str, shape: tuple[int, ...] = (224, 224, 3)) -> str:
    """Keras's own file name of a backbone's ImageNet notop weights."""
    name = BACKBONES[backbone][2]
    if name:
        return name
    rows = shape[0] if shape[0] in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


def resolve_weights(
    backbone: str,
    weights: str,
    shape: tuple[int, ...] = (224, 224, 3),
    setting: config.EnvSetting | None = None,
) -> Path | None:
    """The weights file to load: a path as given; for ``imagenet`` the data directory's file
    with Keras's name, else Keras's cache; None means "let Keras download it".  ``setting``:
    the environment variable the study took ``weights`` from (named in the error)."""
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise StudyDefinitionError(
                f"Backbone weights file {path} not found: "
                f"{_weights_fix(setting, f'the file at {path}')}."
            )
        return path
    fname = weights_file_name(backbone, shape)
    places = []
    root = data_mod.data_dir()
    if root is not None:
        places.append(root / fname)
    places.append(keras_models_dir() / fname)
    for place in places:
        if place.is_file():
            return place
    return None


def keras_models_dir() -> Path:
    """Keras's cache of downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "models"


def weights_where() -> str:
    """The data directory where ImageNet weights files are looked for, in the user's words."""
    return _data_dir_words()


def _data_dir_words() -> str:
    found = config.find_data_dir()
    if found.path is not None:
        return str(found.path)
    return f"the data directory (--data-dir, ${config.DATA_DIR_ENV} or [tool.searchlab] data_dir)"


def _weights_fix(setting: config.EnvSetting | None, put: str) -> str:
    """How to change the weights this study asked for, in its own terms: the environment
    variable a ``searchlab.setting`` read them from, else the study file's ``weights=``."""
    if setting is not None:
        name, study_file = setting.name, setting.study_file or "STUDY_FILE"
        return (
            f"this study takes them from ${name}: run `{name}=none searchlab run {study_file}` "
            f"(a random fixed backbone) or set {name} to a weights file, or put {put}"
        )
    return (
        "set weights=None (a random fixed backbone) or the path of a weights file in the study "
        f"file's Transfer(...), or put {put}"
    )


def weights_fix(
    backbone: str, shape: tuple[int, ...], setting: config.EnvSetting | None = None
) -> str:
    """What to do when a backbone's ImageNet weights are missing (``doctor`` says it too)."""
    fname = weights_file_name(backbone, shape)
    return _weights_fix(setting, f"{fname} in {_data_dir_words()}")


def _missing_weights(
    backbone: str, shape: tuple[int, ...], exc: Exception, spec: Transfer
) -> StudyDefinitionError:
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    why = why.rpartition(" -- ")[2][:100] or type(exc).__name__  # get_file's "URL ... -- why"
    where = _data_dir_words()
    fix = (
        "the study trained with them and its frozen backbone is rebuilt from them: put "
        f"{weights_file_name(backbone, shape)} in {where}"
        if spec.trained
        else weights_fix(backbone, shape, spec.weights_setting)
    )
    return StudyDefinitionError(
        f"{BACKBONES[backbone][0]}'s ImageNet weights are not in {where} nor in "
        f"{keras_models_dir()} and could not be downloaded ({why}); {fix}."
    )
