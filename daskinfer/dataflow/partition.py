"""Worker side of a deployed pipeline: partition runners on the worker's event loop.

The :class:`RuntimePlugin` (a worker plugin, so workers that join later have it
too) adds RPC handlers that the scheduler-side controller calls to start, stop and
inspect runners.  A :class:`PartitionRunner` builds the streamz graph
``from_inbox -> smart_batch -> infer -> to_outbox`` for one inbox partition; the
model runs in a thread so the loop stays free, and at most ``max-inflight``
batches are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin
from streamz import Stream

from daskinfer.dataflow import streams  # noqa: F401  (registers smart_batch / infer)
from daskinfer.dataflow import nodes  # noqa: F401  (registers from_inbox / to_outbox)
from daskinfer.connectors.base import Connector
from daskinfer.exceptions import ModelNotFoundError
from daskinfer.models.registry import registry_for

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

RUNTIME_PLUGIN = "daskinfer-runtime"
EXTENSION = "daskinfer-runners"


def make_connector(spec: dict[str, Any], worker: Worker, partition: int, epoch: int) -> Connector:
    """The connector named by ``spec["connector"]`` for one inbox partition."""
    kind = spec.get("connector", "embedded")
    if kind == "embedded":
        from daskinfer.connectors.embedded import EmbeddedConnector

        return EmbeddedConnector(worker.scheduler, spec["inbox"], partition, spec["name"], epoch)
    if kind == "redis":
        from daskinfer.connectors.redis import RedisConnector

        return RedisConnector(spec, partition, epoch, consumer=f"{worker.address}/{partition}")
    if kind == "kafka":
        from daskinfer.connectors.kafka import KafkaConnector

        return KafkaConnector(spec, partition, epoch, consumer=f"{worker.address}/{partition}")
    raise ValueError(f"unknown connector {kind!r}")


class PartitionRunner:
    """Runs one partition of a pipeline on this worker."""

    def __init__(self, worker: Worker, spec: dict[str, Any], partition: int, epoch: int):
        self.worker = worker
        self.spec = spec
        self.partition = partition
        self.epoch = epoch
        self.connector: Connector | None = None
        self.source: Any = None
        self.batcher: Any = None
        self.sink: Any = None
        self._infer: Any = None
        self.started_at = time.time()
        self.starting = True
        self.start_error: BaseException | None = None
        self.start_task: asyncio.Future | None = None

    async def start(self, model_timeout: float = 60.0) -> None:
        """Wait for the model, connect, build the graph and start reading."""
        try:
            await self._start(model_timeout)
        except Exception as e:
            logger.error("partition %d of pipeline %r failed to start: %s", self.partition, self.spec["name"], e)
            self.start_error = e
        finally:
            self.starting = False

    async def _start(self, model_timeout: float) -> None:
        model = self.spec.get("model")
        deadline = time.monotonic() + model_timeout
        while model is not None:
            try:
                registry_for(self.worker).get(model)
                break
            except ModelNotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self.connector = make_connector(self.spec, self.worker, self.partition, self.epoch)
        await self.connector.start()
        spec = self.spec
        self.source = Stream.from_inbox(
            self.connector, max_messages=spec.get("read_batch"), max_request_size=spec.get("max_request_size")
        )
        self.batcher = self.source.smart_batch(spec.get("max_batch_size"), spec.get("max_delay"), spec.get("max_inflight"))
        self._infer = self.batcher.infer(model, output=spec.get("outputs"), registry=registry_for(self.worker))
        self.sink = self._infer.to_outbox(
            self.connector, spec["outbox"], spec.get("dead_letter"), on_error=self._failed
        )
        self.source.start()

    def _failed(self, exc: BaseException) -> None:
        if self.source is not None:
            self.source.error = exc
            self.source.stop()

    @property
    def running(self) -> bool:
        return self.source is not None and not self.source.stopped

    @property
    def state(self) -> str:
        if self.starting:
            return "starting"
        if self.running:
            return "running"
        return "failed" if (self.start_error or (self.source and self.source.error)) else "stopped"

    async def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop reading; with ``drain``, finish and commit what was read."""
        if self.start_task is not None and not self.start_task.done():
            self.start_task.cancel()
        if self.source is None:
            return
        self.source.stop()
        task = self.source.task
        if not drain:
            if task is not None:
                task.cancel()
        else:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                last = self.sink._last
                if (
                    (task is None or task.done())
                    and not self.batcher._queue
                    and self.batcher._inflight == 0
                    and (last is None or last.done())
                ):
                    break
                await asyncio.sleep(0.01)
        if self.connector is not None:
            await self.connector.close()

    def status(self) -> dict[str, Any]:
        src, b, sink = self.source, self.batcher, self.sink
        return {
            "pipeline": self.spec["name"],
            "partition": self.partition,
            "epoch": self.epoch,
            "worker": self.worker.address,
            "running": self.running,
            "state": self.state,
            "read": src.read_count if src else 0,
            "answered": sink.written if sink else 0,
            "errors": sink.errors if sink else 0,
            "queued_rows": b._queued_rows if b else 0,
            "busy": self._infer._runner.busy if self._infer is not None and self._infer._runner else 0.0,
            "inflight": b._inflight if b else 0,
            "error": repr(self.start_error or (src.error if src is not None else None))
            if (self.start_error or (src is not None and src.error is not None)) else None,
            **(self.connector.describe() if self.connector else {}),
        }


class RunnerExtension:
    """The partition runners of one worker, and the RPC handlers to manage them."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.runners: dict[tuple[str, int], PartitionRunner] = {}
        worker.handlers.update(
            {
                "daskinfer_runner_start": self.start_runner,
                "daskinfer_runner_stop": self.stop_runner,
                "daskinfer_runner_status": self.runner_status,
            }
        )

    async def start_runner(self, spec: dict[str, Any], partition: int, epoch: int) -> dict[str, Any]:
        key = (spec["name"], partition)
        old = self.runners.pop(key, None)
        if old is not None:
            await old.stop(drain=False)
        runner = PartitionRunner(self.worker, spec, partition, epoch)
        self.runners[key] = runner
        # start in the background (it may wait for the model to load): the controller
        # sees "starting", then "running" or "failed"
        runner.start_task = asyncio.ensure_future(runner.start())
        logger.info("started partition %d of pipeline %r (epoch %d)", partition, spec["name"], epoch)
        return runner.status()

    async def stop_runner(self, pipeline: str, partition: int | None = None, drain: bool = True) -> list[int]:
        keys = [k for k in self.runners if k[0] == pipeline and (partition is None or k[1] == partition)]
        await asyncio.gather(*(self.runners[k].stop(drain=drain) for k in keys))
        for k in keys:
            self.runners.pop(k, None)
        return [k[1] for k in keys]

    def runner_status(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        return [r.status() for (p, _), r in self.runners.items() if pipeline is None or p == pipeline]

    async def close(self) -> None:
        await asyncio.gather(*(r.stop(drain=False) for r in self.runners.values()), return_exceptions=True)
        self.runners.clear()


class RuntimePlugin(WorkerPlugin):
    """Gives every worker (also later ones) the partition-runner handlers."""

    name = RUNTIME_PLUGIN
    idempotent = True

    def setup(self, worker: Worker) -> None:
        if EXTENSION not in worker.extensions:
            worker.extensions[EXTENSION] = RunnerExtension(worker)

    async def teardown(self, worker: Worker) -> None:
        ext = worker.extensions.pop(EXTENSION, None)
        if ext is not None:
            await ext.close()
