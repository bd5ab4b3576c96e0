"""What the gRPC and REST front ends of the model server share: models, metadata, inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.models.spec import Model
from daskinfer.tensors import TensorSpec
from daskinfer.models.registry import Deployment
from daskinfer.remote import v2
from daskinfer.server.batcher import ServerBatcher

logger = logging.getLogger(__name__)

PLATFORMS = {"onnx": "onnxruntime_onnx", "python": "daskinfer_python", "remote": "daskinfer_remote"}


class ModelNotServed(LookupError):
    """No model of that name (and version) is served here."""


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """v2 metadata of one tensor: name, datatype, shape with -1 for variable dimensions."""
    datatype = v2.BYTES if spec.dtype is None else v2.datatype_of(spec.dtype)
    shape = [-1] if spec.shape is None else [-1 if d is None else int(d) for d in spec.shape]
    return {"name": spec.name, "datatype": datatype, "shape": shape}


@dataclass
class ServedModel:
    """One model behind the server: its deployment, batcher and v2 metadata."""

    deployment: Deployment
    batcher: ServerBatcher

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def version(self) -> str:
        return self.deployment.version

    def metadata(self) -> dict[str, Any]:
        dep = self.deployment
        return {
            "name": dep.name,
            "versions": [dep.version],
            "platform": PLATFORMS.get(getattr(dep.model, "kind", ""), "daskinfer"),
            "inputs": [tensor_metadata(s) for s in dep.inputs or []],
            "outputs": [tensor_metadata(s) for s in dep.outputs or []],
        }

    async def infer(self, block: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Validate ``block`` against the model, batch it with other callers' and run it.

        Raises :class:`~daskinfer.exceptions.InputValidationError` for a bad request,
        :class:`~daskinfer.server.batcher.ServerOverloaded` when the queue is full and
        whatever the model raises.
        """
        block, rows = self.deployment.first.prepare(block)
        out = await self.batcher.submit(block, rows)
        if outputs:
            missing = [o for o in outputs if o not in out]
            if missing:
                raise KeyError(f"model {self.name!r} has no output {missing[0]!r}; outputs: {sorted(out)}")
            out = {o: out[o] for o in outputs}
        return out


class ServerCore:
    """The models of one server, by name."""

    def __init__(self, deployments: list[Deployment], policy: BatchPolicy, max_queue_rows: int):
        self.models: dict[str, ServedModel] = {}
        for dep in deployments:
            if dep.name in self.models:
                raise ValueError(f"model {dep.name!r} is given twice; serve one version per name")
            self.models[dep.name] = ServedModel(dep, ServerBatcher(dep, policy, max_queue_rows))
        self.ready = False

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model ``name``; ``version`` "" means the one served."""
        m = self.models.get(name)
        if m is None:
            raise ModelNotServed(f"model {name!r} is not served here; models: {sorted(self.models)}")
        if version and version != m.version:
            raise ModelNotServed(f"model {name!r} version {version!r} is not served here; versions: [{m.version!r}]")
        return m

    def close(self) -> None:
        self.ready = False
        for m in self.models.values():
            m.batcher.close()
            m.deployment.retire()


def load_models(models: Any) -> list[Deployment]:
    """Load a :class:`Model`, a list of them or a ``{name: Model}`` dict (blocking)."""
    from daskinfer.models.registry import load_deployment

    if isinstance(models, Model):
        models = [models]
    elif isinstance(models, dict):
        models = list(models.values())
    out = []
    try:
        for m in models:
            if not isinstance(m, Model):
                raise TypeError(f"the server serves daskinfer Models (OnnxModel, PythonModel...), got {type(m).__name__}")
            out.append(load_deployment(m))
    except BaseException:
        for d in out:
            d.retire()
        raise
    return out
