"""A KerasTuner-style study: ``build_model(hp)`` declares the space while it builds.

Existing KerasTuner code runs unchanged: give ``model=build_model`` and ``space=None``.

    searchlab run studies/mnist_hp.py                          # Optuna TPE
    searchlab run studies/mnist_hp.py --engine keras-tuner     # KerasTuner's Bayesian oracle
    searchlab run studies/mnist_hp.py --strategy hyperband --engine keras-tuner
    searchlab export studies/mnist_hp.py -o best.h5

Validation uses a held-out 10% of MNIST's training split.  Grid search enumerates every path
through ``build_model`` (the dropout rate exists only when ``dropout`` is on).
"""

import keras
from keras import layers

from searchlab import Dataset, Study


def build_model(hp):
    model = keras.Sequential([keras.Input(shape=(28, 28)), layers.Flatten()])
    for i in range(hp.Int("num_layers", 1, 2)):
        model.add(
            layers.Dense(
                units=hp.Int(f"units_{i}", min_value=64, max_value=256, step=64),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        with hp.conditional_scope("dropout", [True]):
            model.add(layers.Dropout(rate=hp.Float("rate", 0.1, 0.4, step=0.15)))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Choice("lr", [1e-3, 3e-3])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


study = Study(
    name="mnist-hp",
    space=None,
    model=build_model,
    data=Dataset("mnist", validation=0.1),
    objective="val_accuracy",
    strategy="bayesian",
    trials=20,
    epochs=5,
    seed=0,
    batch_size=128,
)
