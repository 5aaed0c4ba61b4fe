"""VGG16 (ImageNet weights) with a new head on CIFAR-10: how many backbone layers to freeze,
how wide the head, how much dropout, which learning rate and batch size.

    searchlab run studies/cifar_vgg.py --try            # 2 trials x 1 epoch, small, throwaway
    searchlab run studies/cifar_vgg.py                  # Bayesian (TPE), 20 trials x 3 epochs
    searchlab run studies/cifar_vgg.py --strategy grid  # 3 x 3 x 2 x 2 x 2 grid points
    searchlab export studies/cifar_vgg.py -o best.h5    # the complete model, raw images in

Trials that freeze the same backbone prefix share its outputs through the feature cache
(`.searchlab/feature-cache/`): each frozen prefix sees the images once per study, not once
per epoch per trial.  With internet, Keras downloads CIFAR-10 and the weights.  Offline, put
a CIFAR-10 .npz (``cifar10.npz`` or ``cifar10_subset*.npz``) and
``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` in the data directory (``--data-dir``,
``$SEARCHLAB_DATA_DIR`` or ``[tool.searchlab] data_dir`` in pyproject.toml), or run with
``CIFAR_VGG_WEIGHTS=none`` (``searchlab doctor studies/cifar_vgg.py`` says what is missing).

Environment knobs, read when the file is loaded (``searchlab.setting``):
    CIFAR_VGG_WEIGHTS     ``imagenet`` (default), ``none`` (a fixed random backbone), or a path
    CIFAR_VGG_INPUT_SIZE  upsample the 32x32 images to this size first, e.g. 64 (default 32)
    CIFAR_VGG_CACHE       ``0`` trains every trial on the whole model (no feature cache)
"""

import searchlab
from searchlab import Choice, Dataset, Float, Int, Study
from searchlab.models import Transfer

_weights = searchlab.setting("CIFAR_VGG_WEIGHTS", default="imagenet")
_size = int(searchlab.setting("CIFAR_VGG_INPUT_SIZE", default="32"))

vgg16 = Transfer(
    "vgg16",
    weights=None if _weights.lower() == "none" else _weights,
    input_size=None if _size == 32 else _size,
    pooling="avg",
    cache=searchlab.setting("CIFAR_VGG_CACHE", default="1") != "0",
)

study = Study(
    name="cifar-vgg16",
    space={
        # VGG16 without its top has 18 layers; 10 / 14 / 18 freeze up to the end of block
        # 3 / 4 / 5 (18: only the head trains).  Declared first, so grid search runs the
        # trials of one cut point together.
        "frozen_layers": Int(10, 18, grid=[10, 14, 18]),
        "head_width": Choice([128, 256, 512]),
        "dropout": Float(0.0, 0.5, grid=[0.0, 0.3]),
        "learning_rate": Float(1e-4, 3e-3, log=True, grid=[1e-4, 1e-3]),
        "batch_size": Choice([32, 64]),
    },
    model=vgg16,
    # scale=False keeps pixels in 0..255, which VGG16's own preprocessing expects.
    data=Dataset("cifar10", validation="test", scale=False),
    objective="val_accuracy",
    direction="maximize",
    strategy="bayesian",
    trials=20,
    epochs=3,
    seed=0,
)
