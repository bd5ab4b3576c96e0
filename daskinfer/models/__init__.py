"""Model kinds: one module per kind, all sharing :mod:`daskinfer.models.base`."""

from daskinfer.models.base import LoadedModel, Model, TensorSpec
from daskinfer.models.onnx import OnnxModel
from daskinfer.models.python import PythonModel
from daskinfer.models.remote import RemoteModel

__all__ = ["LoadedModel", "Model", "OnnxModel", "PythonModel", "RemoteModel", "TensorSpec"]
