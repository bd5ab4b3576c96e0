"""Models: plain specs (one module per kind), the worker plugin that holds them, the
registry of loaded models on a worker, and deployment."""

from daskinfer.models.loaded import LoadedModel
from daskinfer.models.onnx import OnnxModel
from daskinfer.models.plugin import ModelPlugin
from daskinfer.models.python import PythonModel
from daskinfer.models.remote import RemoteModel
from daskinfer.models.spec import Model
from daskinfer.tensors import TensorSpec

__all__ = ["LoadedModel", "Model", "ModelPlugin", "OnnxModel", "PythonModel", "RemoteModel", "TensorSpec"]
