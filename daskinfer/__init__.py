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
from daskinfer.dataflow import nodes, streams  # noqa: F401  (registers the streamz operators)
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.dataflow.pipeline import (
    Pipeline,
    PipelineHandle,
    delete_topic,
    deploy_pipeline,
    get_pipeline,
    pipelines,
    topics,
)
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
from daskinfer.wire.messages import Request, Result

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
