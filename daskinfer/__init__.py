"""daskinfer: high-throughput streaming model inference on Dask.

Compose a :class:`Pipeline` of stages on columnar batches (``map_batches``, ``infer``,
``ensemble``, ``route``...), deploy it with :func:`deploy_pipeline` as partitions on the
workers, and send requests with :class:`InferenceClient`.  Models are held by worker
plugins (:class:`OnnxModel`, :class:`PythonModel`, :class:`RemoteModel`), deployed with
:func:`deploy`.  The streamz operators ``smart_batch``, ``infer`` and ``run_pipeline``
serve notebooks and batch jobs.
"""

from daskinfer import (
    convert,  # noqa: F401  (daskinfer.convert.to_onnx; converters load on use)
    settings,  # noqa: F401  (loads the defaults into dask.config)
)
from daskinfer.client import InferenceClient
from daskinfer.connectors.registry import ConnectorPlugin, register_connector
from daskinfer.control.admin import delete_topic, get_pipeline, pipelines, topics
from daskinfer.control.deploy import PipelineHandle, deploy_pipeline
from daskinfer.dataflow import streams  # noqa: F401  (registers the streamz operators)
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.dataflow.pipeline import Pipeline
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
    StageError,
)
from daskinfer.models import LoadedModel, Model, ModelPlugin, OnnxModel, PythonModel, RemoteModel, TensorSpec
from daskinfer.models.deploy import deploy, deployed_models, undeploy
from daskinfer.server import ModelServer
from daskinfer.testing import bundled_model_path
from daskinfer.version import __version__
from daskinfer.wire.messages import Request, Result


def __getattr__(name: str):
    # daskinfer.predict imports dask.dataframe (and pyarrow): only when it is first used
    if name == "predict":
        from daskinfer.scoring import predict

        return predict
    raise AttributeError(f"module 'daskinfer' has no attribute {name!r}")


__all__ = [
    "__version__",
    "BatchPolicy",
    "CodecError",
    "ConfigError",
    "ConnectorPlugin",
    "DaskInferError",
    "InferenceClient",
    "InputValidationError",
    "LoadedModel",
    "Model",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelPlugin",
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
    "register_connector",
    "ResultError",
    "StageError",
    "TensorSpec",
    "bundled_model_path",
    "delete_topic",
    "deploy",
    "deploy_pipeline",
    "deployed_models",
    "get_pipeline",
    "pipelines",
    "predict",
    "topics",
    "undeploy",
]
