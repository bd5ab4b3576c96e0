"""Smart batching across the concurrent callers of one served model.

Every call (gRPC or REST) puts its block in the model's queue and awaits its own
rows back.  :class:`~daskinfer.dataflow.batching.BatchPolicy` decides when the queued blocks
form a batch: whenever fewer than ``max_inflight`` model calls run, everything queued
(up to ``max_batch_size`` rows) goes as one model call; while the model is busy, new
calls queue up and form the next, larger batch.  No timer at light load.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.server.errors import Overloaded
from daskinfer.tensors import concat, split

if TYPE_CHECKING:
    from daskinfer.models.registry import Deployment

logger = logging.getLogger(__name__)


class ServerOverloaded(Overloaded):
    """The model's queue is full: the caller should back off and retry."""


def _signature(block: dict[str, np.ndarray]) -> tuple:
    """What must agree for blocks to be joined into one batch."""
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in block.items())


@dataclass
class _Item:
    block: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    enqueued: float
    signature: tuple = field(default=())


class ServerBatcher:
    """Batches the calls of one model on one event loop.

    Parameters
    ----------
    deployment : Deployment
        The loaded model (its ``apredict`` runs a batch without blocking the loop).
    policy : BatchPolicy
        Batch size, delay and model calls in flight.
    max_queue_rows : int
        Rows allowed to wait; beyond this :meth:`submit` raises :class:`ServerOverloaded`.
    """

    def __init__(self, deployment: Deployment, policy: BatchPolicy, max_queue_rows: int):
        self.deployment = deployment
        self.policy = policy
        self.max_queue_rows = max_queue_rows
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0
        self.rows = 0
        self.timed_calls = 0  # calls whose queue and model time are summed below
        self.queue_ns = 0
        self.infer_ns = 0

    async def submit(self, block: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Queue a validated block of ``rows`` rows; return its outputs."""
        if self._queue and self._queued_rows + rows > self.max_queue_rows:
            raise ServerOverloaded(
                f"model {self.deployment.name!r}: {self._queued_rows} rows are already queued "
                f"(limit {self.max_queue_rows}); try again later"
            )
        loop = asyncio.get_running_loop()
        item = _Item(block, rows, loop.create_future(), loop.time(), _signature(block))
        self._queue.append(item)
        self._queued_rows += rows
        self._pump()
        return await item.future

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # callers that went away (cancelled) leave the queue here
            while self._queue and self._queue[0].future.done():
                self._queued_rows -= self._queue.popleft().rows
            if not self._queue:
                break
            decision = self.policy.decide(
                [it.rows for it in self._queue], self._inflight, loop.time() - self._queue[0].enqueued
            )
            if decision.take == 0:
                if decision.wait is not None and self._timer is None:
                    self._timer = loop.call_later(decision.wait, self._on_timer)
                return
            first = self._queue[0].signature
            items = []
            for _ in range(decision.take):
                if self._queue[0].signature != first:
                    break  # blocks of another shape or dtype form their own batch
                items.append(self._queue.popleft())
            self._queued_rows -= sum(it.rows for it in items)
            items = [it for it in items if not it.future.done()]
            if not items:
                continue
            self._inflight += 1
            task = loop.create_task(self._run(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    async def _run(self, items: list[_Item]) -> None:
        try:
            block = concat([it.block for it in items]) if len(items) > 1 else items[0].block
            loop = asyncio.get_running_loop()
            start = loop.time()
            out = await self.deployment.apredict(block)
            pieces = split(out, [it.rows for it in items])
            self.batches += 1
            self.rows += sum(it.rows for it in items)
            self.timed_calls += len(items)
            self.queue_ns += int(sum(start - it.enqueued for it in items) * 1e9)
            self.infer_ns += int((loop.time() - start) * len(items) * 1e9)
            for it, piece in zip(items, pieces):
                if not it.future.done():
                    it.future.set_result(piece)
        except Exception as e:
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
        finally:
            self._inflight -= 1
            self._pump()

    def close(self) -> None:
        """Fail what is still queued (the server is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            it = self._queue.popleft()
            if not it.future.done():
                it.future.set_exception(ServerOverloaded(f"model {self.deployment.name!r}: the server is stopping"))
        self._queued_rows = 0
