"""Dense classifiers: Flatten -> N x (Dense -> Dropout) -> Dense(classes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from searchlab.data import DataInfo


def dense_classifier(params: Mapping[str, Any], info: DataInfo) -> keras.Model:
    """A dense net for classification.

    Params (all optional): ``layers`` (hidden layers, default 1), ``units`` (width, 128),
    ``dropout`` (0.0), ``activation`` (``relu``), ``learning_rate`` (1e-3),
    ``optimizer`` (``adam`` or ``sgd``).
    """
    inputs = keras.Input(shape=info.input_shape)
    x = keras.layers.Flatten()(inputs)
    for i in range(int(params.get("layers", 1))):
        x = keras.layers.Dense(
            int(params.get("units", 128)),
            activation=params.get("activation", "relu"),
            name=f"hidden_{i}",
        )(x)
        if float(params.get("dropout", 0.0)) > 0:
            x = keras.layers.Dropout(float(params["dropout"]), name=f"dropout_{i}")(x)
    # float32 output: under a mixed-precision policy the softmax and the loss stay float32
    outputs = keras.layers.Dense(
        info.num_classes, activation="softmax", dtype="float32", name="classes"
    )(x)
    model = keras.Model(inputs, outputs, name="dense_classifier")
    lr = float(params.get("learning_rate", 1e-3))
    optimizer = (
        keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
        if params.get("optimizer") == "sgd"
        else keras.optimizers.Adam(learning_rate=lr)
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
