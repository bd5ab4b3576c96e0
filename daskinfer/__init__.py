"""daskinfer: high-throughput streaming model inference on Dask.

Models are held by worker plugins (:class:`OnnxModel`, :class:`PythonModel`),
deployed with :func:`deploy`, and run by streamz operators (``smart_batch``,
``infer``) or by the partitioned inbox -> outbox pipeline.
"""

from daskinfer import settings  # noqa: F401  (loads the defaults into dask.config)
from daskinfer.dataflow import streams  # noqa: F401  (registers the streamz operators)
from daskinfer.dataflow import nodes  # noqa: F401  (registers from_inbox / to_outbox)
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.client import InferenceClient
from daskinfer.models.deploy import deploy, deployed_models, undeploy
from daskinfer.exceptions import (
    CodecError,
    ConfigError,
    DaskInferError,
    InputValidationError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    OutputCountError,
    RequestError,
    ResultError,
)
from daskinfer.wire.messages import Request, Result
from daskinfer.dataflow.pipeline import Pipeline, PipelineHandle, deploy_pipeline
from daskinfer.models import LoadedModel, Model, OnnxModel, PythonModel, RemoteModel, TensorSpec
from daskinfer.server import ModelServer
from daskinfer import convert  # noqa: F401  (daskinfer.convert.to_onnx; converters load on use)
from daskinfer.testing import bundled_model_path

__version__ = "0.1.0"


def __getattr__(name: str):
    # daskinfer.predict imports dask.dataframe (and pyarrow): only when it is first used
    if name == "predict":
        from daskinfer.scoring import predict

        return predict
    raise AttributeError(f"module 'daskinfer' has no attribute {name!r}")

__all__ = [
    "BatchPolicy",
    "CodecError",
    "ConfigError",
    "DaskInferError",
    "InferenceClient",
    "InputValidationError",
    "LoadedModel",
    "Model",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelServer",
    "OnnxModel",
    "OutputCountError",
    "Pipeline",
    "PipelineHandle",
    "PythonModel",
    "RemoteModel",
    "Request",
    "RequestError",
    "Result",
    "ResultError",
    "TensorSpec",
    "bundled_model_path",
    "deploy",
    "deploy_pipeline",
    "deployed_models",
    "predict",
    "undeploy",
]
