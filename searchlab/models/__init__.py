"""Model builders: functions of a params dict (and the data's shape) that return a compiled
Keras model. Only the Keras 3 API is used, so they run on every Keras backend."""

from searchlab.models.dense import dense_classifier

__all__ = ["dense_classifier"]
