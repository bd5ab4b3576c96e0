"""The worker end of daskinfer's control path, installed on every worker (also later ones): the
partitions' RPC handlers (:class:`~daskinfer.control.runtime.PartitionsExtension`), the direct
endpoint, and the workers' Prometheus collectors.

``dask worker --preload daskinfer.preload`` installs it when the worker starts; a client that
deploys a pipeline registers :class:`RuntimePlugin`, so that workers that join later get it too.
When the worker closes, its partitions drain first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

from daskinfer import settings
from daskinfer.control.runtime import EXTENSION, PartitionsExtension

if TYPE_CHECKING:
    from distributed import Client, Worker

RUNTIME_PLUGIN = "daskinfer-runtime"


def partitions_of(worker: Worker) -> PartitionsExtension:
    ext = worker.extensions.get(EXTENSION)
    if ext is None:
        ext = worker.extensions[EXTENSION] = PartitionsExtension(worker)
        if settings.metrics_enabled():  # (this worker's own HTTP server: its own config decides)
            from daskinfer.control.metrics import watch_worker  # needs prometheus_client

            watch_worker(ext)
    return ext


class RuntimePlugin(WorkerPlugin):
    """Gives every worker (also later ones) the partition handlers and the direct endpoint."""

    name = RUNTIME_PLUGIN
    idempotent = True

    def setup(self, worker: Worker) -> None:
        partitions_of(worker)

    async def teardown(self, worker: Worker) -> None:
        ext = worker.extensions.get(EXTENSION)
        if ext is not None:
            await ext.close(drain=True)


async def ensure_runtime_async(client: Client) -> None:
    """Register :class:`RuntimePlugin` with ``client``'s cluster (once)."""
    await client.register_plugin(RuntimePlugin())


__all__ = ["RUNTIME_PLUGIN", "RuntimePlugin", "ensure_runtime_async", "partitions_of"]
