"""The model server's back end: daskinfer models loaded in this process, batched across callers."""

from __future__ import annotations

from typing import Any

import numpy as np

from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.models.registry import Deployment
from daskinfer.models.spec import Model
from daskinfer.server.batcher import ServerBatcher
from daskinfer.server.service import CallStats, V2Model, V2Service, model_config, tensor_metadata, v2_metadata

__all__ = ["ServedModel", "ServerCore", "load_models", "tensor_metadata"]


class ServedModel(V2Model):
    """One model behind the server: its deployment, batcher and v2 metadata."""

    def __init__(self, deployment: Deployment, batcher: ServerBatcher):
        self.deployment = deployment
        self.batcher = batcher
        self.name = deployment.name
        self.version = deployment.version
        self.stats = CallStats()

    @property
    def kind(self) -> str:
        return getattr(self.deployment.model, "kind", "")

    def metadata(self) -> dict[str, Any]:
        dep = self.deployment
        return v2_metadata(dep.name, dep.version, self.kind, list(dep.inputs or []), list(dep.outputs or []))

    def config(self) -> dict[str, Any]:
        dep = self.deployment
        return model_config(
            dep.name, self.kind, list(dep.inputs or []), list(dep.outputs or []), self.batcher.policy.max_batch_size
        )

    def statistics(self) -> dict[str, Any]:
        b = self.batcher
        self.stats.executions, self.stats.timed_count = b.batches, b.timed_calls
        self.stats.queue_ns, self.stats.infer_ns = b.queue_ns, b.infer_ns
        return super().statistics()

    async def run(self, inputs: dict[str, np.ndarray], timeout: float | None) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the model, batch them with other callers' and run them.

        Raises :class:`~daskinfer.exceptions.InputValidationError` for a bad request,
        :class:`~daskinfer.server.batcher.ServerOverloaded` when the queue is full and
        whatever the model raises.
        """
        block, rows = self.deployment.first.prepare(inputs)
        return await self.batcher.submit(block, rows)


class ServerCore(V2Service):
    """The models of one model server, by name."""

    def __init__(
        self,
        deployments: list[Deployment],
        policy: BatchPolicy,
        max_queue_rows: int,
        max_concurrent_calls: int = 0,
        retry_after: float = 1.0,
    ):
        super().__init__(max_concurrent_calls, retry_after)
        self._models: dict[str, ServedModel] = {}
        for dep in deployments:
            if dep.name in self._models:
                raise ValueError(f"model {dep.name!r} is given twice; serve one version per name")
            self._models[dep.name] = ServedModel(dep, ServerBatcher(dep, policy, max_queue_rows))

    def models(self) -> dict[str, ServedModel]:
        return self._models

    def close(self) -> None:
        self.ready = False
        for m in self._models.values():
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
                raise TypeError(
                    f"the server serves daskinfer Models (OnnxModel, PythonModel...), got {type(m).__name__}"
                )
            out.append(load_deployment(m))
    except BaseException:
        for d in out:
            d.retire()
        raise
    return out
