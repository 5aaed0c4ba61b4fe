"""Transfer learning written by hand, as tutorials write it: a frozen VGG16 inside a
``Sequential`` with a new head, in a KerasTuner-style ``build_model(hp)``.

    searchlab run studies/handwritten_vgg.py

Nothing here mentions searchlab's cache: searchlab finds that the model's first layer (the
VGG16) is frozen and deterministic, computes its output for the images once, and trains
only the head on it in every trial (the trial runs are tagged ``searchlab.cache=used`` and
``searchlab.cache_layer``).  The same function runs unchanged under KerasTuner's
``RandomSearch`` (``scripts/bench_transfer.py --cases handwritten`` compares the two).

With internet Keras downloads CIFAR-10 and the ImageNet weights.  Offline, put a CIFAR-10
``.npz`` and ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` in ``~/.keras``'s
folders, or set ``HANDWRITTEN_VGG_WEIGHTS`` to a weights file (``none``: random weights;
then give the study ``backbone_seed=`` so every trial builds the same backbone and the
cache applies).
"""

import keras

import searchlab
from searchlab import Dataset, Study

WEIGHTS = searchlab.setting("HANDWRITTEN_VGG_WEIGHTS", default="imagenet")


def build_model(hp):
    base = keras.applications.VGG16(
        include_top=False,
        weights=None if WEIGHTS.lower() == "none" else WEIGHTS,
        input_shape=(32, 32, 3),
    )
    base.trainable = False  # freeze the convolutional base
    model = keras.Sequential(
        [
            base,
            keras.layers.Flatten(),
            keras.layers.Dense(hp.Choice("units", [128, 256, 512]), activation="relu"),
            keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5)),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(hp.Float("learning_rate", 1e-4, 3e-3, sampling="log")),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


study = Study(
    name="handwritten-vgg16",
    space=None,
    model=build_model,
    # scale=False keeps pixels in 0..255, as VGG16 was trained on them
    data=Dataset("cifar10", validation="test", scale=False),
    strategy="random",
    trials=20,
    epochs=2,
)
