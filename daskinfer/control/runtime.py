"""The partitions a worker runs, and the RPC handlers the scheduler's controller calls to start,
stop and inspect them (installed on every worker by :mod:`daskinfer.control.worker`).  When the
worker closes, its partitions drain first: what they read is answered, what they did not take
goes back to the clients, who send it to the new owners.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from daskinfer.connectors.direct.endpoint import endpoint_for
from daskinfer.dataflow.partition import PartitionRunner
from daskinfer.dataflow.spec import PipelineSpec

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

EXTENSION = "daskinfer-partitions"


class PartitionsExtension:
    """The partition runners of one worker, and the RPC handlers to manage them."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.runners: dict[tuple[str, int], PartitionRunner] = {}
        endpoint_for(worker)
        worker.handlers.update(
            {
                "daskinfer_runner_start": self.start_runner,
                "daskinfer_runner_stop": self.stop_runner,
                "daskinfer_runner_status": self.runner_status,
                "daskinfer_runner_wait": self.wait_runner,
            }
        )

    async def start_runner(self, spec: dict[str, Any], partition: int, epoch: int) -> dict[str, Any]:
        pspec = PipelineSpec.from_plain(spec)
        key = (pspec.name, partition)
        old = self.runners.pop(key, None)
        if old is not None:
            await old.stop(drain=False)
        runner = PartitionRunner(self.worker, pspec, partition, epoch)
        self.runners[key] = runner
        # start in the background (it may wait for the model to load): the controller
        # sees "starting", then "running" or "failed"
        runner.start_task = asyncio.ensure_future(runner.start())
        logger.info("started partition %d of pipeline %r (epoch %d)", partition, pspec.name, epoch)
        return await runner.status()

    async def wait_runner(self, pipeline: str, partition: int, epoch: int, timeout: float) -> dict[str, Any]:
        """The status of runner ``(pipeline, partition)`` of ``epoch`` once it started (or ``timeout`` s)."""
        runner = self.runners.get((pipeline, partition))
        if runner is None or runner.epoch != epoch:
            return {"state": "gone"}
        if runner.start_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(runner.start_task), timeout)
            except (asyncio.TimeoutError, Exception):  # its status says how it went
                pass
        return await runner.status()

    async def stop_runner(self, pipeline: str, partition: int | None = None, drain: bool = True) -> list[int]:
        keys = [k for k in self.runners if k[0] == pipeline and (partition is None or k[1] == partition)]
        await asyncio.gather(*(self.runners[k].stop(drain=drain) for k in keys))
        for k in keys:
            self.runners.pop(k, None)
        return [k[1] for k in keys]

    async def runner_status(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                *(r.status() for (p, _), r in self.runners.items() if pipeline is None or p == pipeline)
            )
        )

    async def close(self, drain: bool = True) -> None:
        runners = list(self.runners.values())
        await asyncio.gather(*(r.stop(drain=drain) for r in runners), return_exceptions=True)
        self.runners.clear()

    async def wait_drained(self, timeout: float = 30.0) -> None:
        """Wait until this worker's partitions are stopped (a closing worker's models stay loaded until then)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.runners and loop.time() < end:
            await asyncio.sleep(0.01)
