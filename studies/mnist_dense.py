"""A dense net on MNIST: how many hidden layers, how wide, how much dropout, which learning
rate and batch size.

    searchlab run studies/mnist_dense.py                     # Bayesian (TPE), 20 trials
    searchlab run studies/mnist_dense.py --strategy grid     # every grid point once
    searchlab export studies/mnist_dense.py -o best.h5

Validation uses a held-out 10% of MNIST's training split (the last 6,000 images); the
test split stays untouched.
"""

from searchlab import Choice, Dataset, Float, Int, Study
from searchlab.models import dense_classifier

study = Study(
    name="mnist-dense",
    space={
        "layers": Int(1, 3),
        "units": Int(32, 256, step=32, grid=[64, 256]),
        "dropout": Float(0.0, 0.5, grid=[0.0, 0.3]),
        "learning_rate": Float(1e-4, 1e-2, log=True, grid=[1e-3, 3e-3]),
        "batch_size": Choice([64, 128, 256]),
    },
    model=dense_classifier,
    data=Dataset("mnist", validation=0.1),
    objective="val_accuracy",
    direction="maximize",
    strategy="bayesian",
    trials=20,
    epochs=5,
    seed=0,
)
