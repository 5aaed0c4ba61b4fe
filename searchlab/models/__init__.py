"""Model builders: functions of a params dict (and the data's shape) that return a compiled
Keras model. Only the Keras 3 API is used, so they run on every Keras backend."""

from searchlab.models.dense import dense_classifier
from searchlab.models.transfer import BACKBONES, FineTune, Transfer

__all__ = ["BACKBONES", "FineTune", "Transfer", "dense_classifier"]
