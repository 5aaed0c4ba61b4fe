"""Two-phase fine-tuning of VGG16 on CIFAR-10: first the head alone on the frozen backbone
(``head_epochs``, always on the feature cache), then the backbone unfrozen from layer
``frozen_layers`` on for ``fine_tune_epochs`` more at ``learning_rate * lr_factor``.

    searchlab run studies/cifar_vgg_finetune.py

Same data and weights as studies/cifar_vgg.py (and the same CIFAR_VGG_* knobs).
"""

import searchlab
from searchlab import Choice, Dataset, Float, Int, Study
from searchlab.models import FineTune, Transfer

_weights = searchlab.setting("CIFAR_VGG_WEIGHTS", default="imagenet")
_size = int(searchlab.setting("CIFAR_VGG_INPUT_SIZE", default="32"))

study = Study(
    name="cifar-vgg16-finetune",
    space={
        "frozen_layers": Int(10, 17, grid=[10, 14]),  # phase two trains layers from here on
        "head_epochs": Int(1, 3),
        "fine_tune_epochs": Int(1, 3),
        "lr_factor": Float(0.01, 0.3, log=True, grid=[0.03, 0.1]),
        "head_width": Choice([256, 512]),
        "dropout": Float(0.0, 0.5, grid=[0.0, 0.3]),
        "learning_rate": Float(1e-4, 3e-3, log=True, grid=[1e-3]),
        "batch_size": Choice([32, 64]),
    },
    model=Transfer(
        "vgg16",
        weights=None if _weights.lower() == "none" else _weights,
        input_size=None if _size == 32 else _size,
        fine_tune=FineTune(head_epochs=2, epochs=2, lr_factor=0.1),
        cache=searchlab.setting("CIFAR_VGG_CACHE", default="1") != "0",
    ),
    data=Dataset("cifar10", validation="test", scale=False),
    strategy="bayesian",
    trials=20,
    epochs=2,  # unused: the schedule's head_epochs + fine_tune_epochs set each trial's epochs
    seed=0,
)
