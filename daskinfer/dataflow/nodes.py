"""The streamz nodes of a partition's data path::

    InboxSource(connector) -> smart_batch -> answer_batches(stages) -> write_results(connector)

- :class:`InboxSource` (a streamz ``Source``) reads the inbox partition and decodes each read
  into an :class:`~daskinfer.dataflow.batch.InboxBatch` (columns; messages that do not
  decode are kept apart as rejected);
- ``smart_batch`` (:mod:`daskinfer.dataflow.streams`) groups what queued while the
  batches in flight run;
- :class:`answer_batches` runs the pipeline's stages and emits the answers in read order;
- :class:`write_results` writes them, then commits the reads, in order.

What the partition's runner needs from a node is a public attribute of that node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from streamz import Stream
from streamz.sources import Source

from daskinfer.connectors.base import Connector, PartitionRevoked
from daskinfer.dataflow.batch import InboxBatch, Origin, Rejected, RequestBatch, group_by_signature
from daskinfer.dataflow.results import ResultWriter
from daskinfer.dataflow.run import answer
from daskinfer.dataflow.stages import Stage, StageContext
from daskinfer.dataflow.stats import PartitionStats, arrivals
from daskinfer.dataflow.streams import Items
from daskinfer.wire.frames import decode_requests, peek_fields

logger = logging.getLogger(__name__)


def decode_read(payloads: list[bytes], read: Any, max_request_size: int) -> InboxBatch:
    """One read's messages as request batches by signature, and the messages that did not decode."""
    now = time.time()
    decoded = []
    rejected = []
    for data in payloads:
        try:
            cols = decode_requests(data, max_size=max_request_size)
        except Exception as e:  # CodecError, RequestError: this message alone fails
            rejected.append(Rejected(Origin(None, False, now, data), e, peek_fields(data)))
            continue
        decoded.append((cols, Origin(cols.reply_to, cols.framed, now, b"" if cols.framed else data)))
    requests, n = group_by_signature(decoded)
    return InboxBatch(requests, rejected, [read], sum(b.n_rows for b in requests) + len(rejected), n)


def merge(batches: Sequence[InboxBatch]) -> InboxBatch:
    """Several reads as one batch (request batches of the same signature joined)."""
    if len(batches) == 1:
        return batches[0]
    groups: dict[tuple, list[RequestBatch]] = {}
    rejected: list[Rejected] = []
    reads: list[Any] = []
    seen = 0
    for b in batches:
        for rb in b.requests:
            groups.setdefault(rb.signature(), []).append(rb.shift_seq(seen))
        seen += b.seq_end
        rejected += b.rejected
        reads += b.reads
    return InboxBatch(
        [RequestBatch.concat(g) for g in groups.values()], rejected, reads, sum(b.n_rows for b in batches), seen
    )


class InboxSource(Source):
    """Read one inbox partition through ``connector``; emit an :class:`InboxBatch` per read.

    It waits on its downstream (back-pressure): nothing more is read while ``smart_batch``
    holds a full queue.

    Attributes
    ----------
    read_count : int
        Messages read so far.
    error : BaseException or None
        Why reading stopped, if it stopped by itself (the controller restarts the partition).
    task : asyncio.Task or None
        The reading task.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        max_messages: int,
        max_request_size: int,
        max_rows: int,
        poll_timeout: float = 0.5,
        **kwargs: Any,
    ):
        self.connector = connector
        self.max_rows = max_rows
        self.max_messages = max_messages
        self.max_request_size = max_request_size
        self.poll_timeout = poll_timeout
        self.read_count = 0
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.stopped: bool = True
        kwargs.setdefault("asynchronous", True)
        super().__init__(**kwargs)

    def start(self) -> None:
        if self.stopped:
            self.stopped = False
            self.started = True
            self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        try:
            while not self.stopped:
                await self._run()
        except PartitionRevoked as e:
            logger.info("%s", e)
            self.error = e
        except asyncio.CancelledError:
            raise
        except Exception as e:  # broker unreachable etc.: the controller restarts the partition
            logger.exception("inbox reader stopped")
            self.error = e
        finally:
            self.stopped = True

    async def _run(self) -> None:
        msgs = await self.connector.read(self.max_messages, self.poll_timeout)
        if not len(msgs):
            return
        self.read_count += len(msgs)
        # a read larger than a batch goes on in pieces (its commit rides with the last one)
        pieces = decode_read(msgs.payloads, msgs, self.max_request_size).split(self.max_rows)
        pending = self._emit(pieces[0] if len(pieces) == 1 else Items(pieces))
        if pending:
            await asyncio.gather(*pending)


@Stream.register_api()
class answer_batches(Stream):
    """Run ``stages`` on each list of inbox batches from ``smart_batch``; emit the answers in order.

    Batches may finish out of order (several in flight); they are emitted in order, so
    that results with the same key keep request order and commits only move forward.

    Attributes
    ----------
    busy : float
        Seconds spent in model calls.
    batches, rows : int
        Batches and rows answered so far.
    running : int
        Batches being answered now.
    stats : PartitionStats
        Histograms (batch size, queue wait, inference time, latency until written) and errors
        by type, updated once per batch.
    """

    def __init__(
        self,
        upstream: Stream,
        stages: Sequence[Stage],
        context: StageContext,
        outputs: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        self.stages = list(stages)
        self.context = context
        self.outputs = list(outputs) if outputs else None
        self.batches = 0
        self.rows = 0
        self.running = 0
        self.stats = PartitionStats()
        self._last_turn: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()  # referenced until done, so none is collected mid-flight
        super().__init__(upstream, **kwargs)

    @property
    def busy(self) -> float:
        return self.context.model_seconds

    def update(self, x: list[InboxBatch], who: Any = None, metadata: Any = None) -> asyncio.Task:
        task = asyncio.ensure_future(self._answer(x, metadata))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _answer(self, batches: list[InboxBatch], metadata: Any) -> None:
        self._retain_refs(metadata)
        prev, turn = self._last_turn, asyncio.get_running_loop().create_future()
        self._last_turn = turn
        self.running += 1
        try:
            started = time.time()
            result = await answer(merge(batches), self.stages, self.context, self.outputs)
            answered = time.time()
            if prev is not None and not prev.done():
                await asyncio.wait([prev])
            self.batches += 1
            self.rows += result.n_rows
            pending = self._emit(result, metadata=metadata)
            turn.set_result(None)
            if pending:
                await asyncio.gather(*pending)  # written and committed (write_results' task)
            received, requests = arrivals(batches)
            self.stats.record_batch(received, requests, started, answered, time.time(), result.n_rows)
            self.stats.record_errors(result)
        finally:
            self.running -= 1
            if not turn.done():
                turn.set_result(None)
            self._release_refs(metadata)


@Stream.register_api()
class write_results(Stream):
    """Sink: write each batch's answers, then commit the reads they answer, in batch order.

    If a write fails nothing later is committed and ``on_error(exc)`` is called (the runner
    then stops, and the controller restarts the partition; the uncommitted reads are redone).

    Attributes
    ----------
    written, errors : int
        Requests answered (and, of them, with an error) so far.
    idle : bool
        No write is pending.
    error : BaseException or None
        The write that failed.
    """

    def __init__(
        self, upstream: Stream, connector: Connector, writer: ResultWriter, on_error: Any = None, **kwargs: Any
    ):
        self.connector = connector
        self.writer = writer
        self.on_error = on_error
        self.error: BaseException | None = None
        self.written = 0
        self._last: asyncio.Future | None = None
        super().__init__(upstream, **kwargs)

    @property
    def errors(self) -> int:
        return self.writer.errors

    @property
    def idle(self) -> bool:
        return self._last is None or self._last.done()

    def update(self, x: Any, who: Any = None, metadata: Any = None) -> asyncio.Future:
        prev = self._last
        task = asyncio.ensure_future(self._write(x, prev))
        self._last = task
        return task

    async def _write(self, result: Any, prev: asyncio.Future | None) -> None:
        writes = self.writer.encode(result)
        if prev is not None and not prev.done():
            await asyncio.wait([prev])
        if self.error is not None:
            return  # an earlier write failed: nothing after it may be committed
        try:
            await self.connector.write_and_commit(writes, result.reads)
        except Exception as e:
            self.error = e
            if not isinstance(e, PartitionRevoked):
                logger.error("writing results failed, stopping this partition: %s", e)
            if self.on_error is not None:
                self.on_error(e)
            return
        self.written += sum(len(p.batch) for p in result.parts if p.target is None) + len(result.rejected)
