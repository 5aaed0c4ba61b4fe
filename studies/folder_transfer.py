"""Transfer learning on your own images: a folder with one subfolder of images per class.

    photos/
        cats/  001.jpg 002.png ...
        dogs/  ...

    FOLDER_TRANSFER_DIR=photos searchlab run studies/folder_transfer.py
    searchlab export studies/folder_transfer.py -o best.h5   # also best.class_names.json

A VGG16 backbone (ImageNet weights) with a new head, searched over how many backbone layers
to freeze, the head's width and dropout, the learning rate and the batch size.  Every image is
resized to ``image_size``; a fifth of the files (picked by a hash of their path, the same on
every run and every worker) is held out for validation.  Class ids follow the sorted
subfolder names; the names are logged on the session's MLflow run and written beside the
exported model.

Decoded images larger than ``$SEARCHLAB_DATA_MEMORY_MB`` (default 2048 MB) stream from disk,
and the feature cache computes the frozen backbone's outputs by reading them once.

Environment knobs, read when the file is loaded:
    FOLDER_TRANSFER_DIR      the image folder (default ``photos``)
    FOLDER_TRANSFER_SIZE     images are resized to SIZE x SIZE (default 224)
    FOLDER_TRANSFER_WEIGHTS  ``imagenet`` (default), ``none`` (a fixed random backbone), or a
                             path to the weights file
"""

import searchlab
from searchlab import Choice, Dataset, Float, Int, Study
from searchlab.models import Transfer

_size = int(searchlab.setting("FOLDER_TRANSFER_SIZE", default="224"))
_weights = searchlab.setting("FOLDER_TRANSFER_WEIGHTS", default="imagenet")

backbone = Transfer(
    "vgg16",
    weights=None if _weights.lower() == "none" else _weights,
    pooling="avg",
)

study = Study(
    name="folder-transfer",
    space={
        # VGG16 without its top has 18 layers: 14 freezes up to block 4, 18 trains the head only
        "frozen_layers": Int(14, 18, grid=[14, 18]),
        "head_width": Choice([128, 256]),
        "dropout": Float(0.0, 0.5, grid=[0.0, 0.3]),
        "learning_rate": Float(1e-4, 3e-3, log=True, grid=[1e-4, 1e-3]),
        "batch_size": Choice([16, 32]),
    },
    model=backbone,
    data=Dataset(
        directory=searchlab.setting("FOLDER_TRANSFER_DIR", default="photos"),
        image_size=(_size, _size),
        validation=0.2,
        # pixels stay 0..255: the backbone's own preprocessing expects them
        scale=False,
    ),
    objective="val_accuracy",
    strategy="bayesian",
    trials=10,
    epochs=3,
)
