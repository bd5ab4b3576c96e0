"""The streamz nodes of a partition's data path::

    InboxSource(connector) -> smart_batch -> AnswerBatches(stages) -> WriteResults(connector)

- :class:`InboxSource` (a streamz ``Source``) reads the inbox partition and decodes each read
  into an :class:`~daskinfer.dataflow.batch.InboxBatch` (columns; messages that do not
  decode are kept apart as rejected);
- ``smart_batch`` (:mod:`daskinfer.dataflow.streams`) groups what queued while the
  batches in flight run;
- :class:`AnswerBatches` runs the pipeline's stages, one task per batch (up to
  ``max_inflight`` at once), and emits the answers in read order;
- :class:`WriteResults` writes them, then commits the reads, in order; one write at a
  time, each taking everything that waits (so commits never hold up the reads).

What the partition's runner needs from a node is a public attribute of that node.  The two
last nodes are this data path's own: they are not registered on streamz's ``Stream`` (only the
operators meant for users are, see :mod:`daskinfer.dataflow.streams`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamz import Stream
from streamz.sources import Source

from daskinfer.connectors.base import Connector, OutMessage, PartitionRevoked
from daskinfer.dataflow.batch import (
    InboxBatch,
    Origin,
    Rejected,
    RequestBatch,
    ResultBatch,
    ResultPart,
    group_by_signature,
)
from daskinfer.dataflow.results import ResultWriter
from daskinfer.dataflow.run import answer
from daskinfer.dataflow.stages import Stage, StageContext
from daskinfer.dataflow.stats import PartitionStats, arrivals
from daskinfer.dataflow.streams import Items
from daskinfer.tracing import TRACEPARENT, BatchTrace, PartitionTracer
from daskinfer.wire.codec import Encoded, as_bytes
from daskinfer.wire.frames import decode_requests, peek_fields
from daskinfer.wire.v2json import rejected_reply

logger = logging.getLogger(__name__)


def message_traceparent(meta: Any) -> str | None:
    """A ``traceparent`` Kafka header or Redis entry field that a producer set for a whole message."""
    value = meta.get(TRACEPARENT) if meta else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) and value else None


def decode_read(payloads: Sequence[Encoded], read: Any, max_request_size: int) -> InboxBatch:
    """One read's messages as request batches by signature, and the messages that did not decode.

    ``read.meta`` (Kafka headers, Redis entry fields) may mark a message as v2 (KServe) JSON."""
    now = time.time()
    decoded = []
    rejected = []
    metas = getattr(read, "meta", None) or itertools.repeat(None)
    for data, meta in zip(payloads, metas):
        try:
            cols = decode_requests(data, max_size=max_request_size, meta=meta)
        except Exception as e:  # CodecError, RequestError: this message alone fails
            raw = as_bytes(data)  # kept for the dead letter (a split message as one bytes)
            origin = Origin(None, False, now, raw, rejected_reply(meta), message_traceparent(meta))
            rejected.append(Rejected(origin, e, peek_fields(data, meta)))
            continue
        origin = Origin(cols.reply_to, cols.framed, now, b"" if cols.framed else as_bytes(data), cols.v2)
        if meta:
            origin.traceparent = message_traceparent(meta)
        decoded.append((cols, origin))
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

    It never waits for the batches it read to be answered: only for room in ``smart_batch``'s
    queue (back-pressure), so reads go on while up to ``max_inflight`` batches run.

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


@dataclass(slots=True)
class Answer:
    """A batch's answers on their way to the writer, with when its requests came and ran (for the stats)."""

    result: ResultBatch
    received: list[float]
    requests: list[int]
    started: float
    answered: float
    trace: BatchTrace | None = None  # its spans, ended once it is written (daskinfer.tracing)


def failed_batch(batch: InboxBatch, exc: BaseException) -> ResultBatch:
    """Every request of ``batch`` answered with ``exc``: what a batch gets when answering it failed
    outside the stages' own error handling (a bug of ours), so the partition goes on."""
    error = ("InternalError", f"answering the batch failed: {type(exc).__name__}: {exc}")
    parts = [ResultPart(rb, None, error) for rb in batch.requests]
    return ResultBatch(parts, batch.rejected, batch.reads, batch.n_rows)


class AnswerBatches(Stream):
    """Run ``stages`` on each list of inbox batches from ``smart_batch``; emit the answers in order.

    Each batch runs as its own task, so up to ``max_inflight`` batches (``smart_batch``'s bound)
    run at once; they may finish out of order, and are emitted in the order they were read, so
    that results with the same key keep request order and commits only move forward.  A batch's
    task ends once its answers are handed to the writer and the writer has room (back-pressure
    by the bytes waiting to be written, never by a write or a commit in progress).

    Attributes
    ----------
    busy : float
        Seconds spent in model calls.
    batches, rows : int
        Batches and rows answered so far.
    running : int
        Batches being answered now (or waiting for an earlier one to be emitted).
    failures : int
        Batches whose answering failed outside the stages' error handling (each request got an
        ``InternalError`` result; the partition went on).
    stats : PartitionStats
        Histograms (batch size, queue wait, inference time, latency until written) and errors
        by type, updated once per batch.
    tracer : PartitionTracer or None
        Makes each batch's spans (None: tracing is off for this pipeline).
    """

    def __init__(
        self,
        upstream: Stream,
        stages: Sequence[Stage],
        context: StageContext,
        outputs: Sequence[str] | None = None,
        tracer: PartitionTracer | None = None,
        **kwargs: Any,
    ):
        self.tracer = tracer
        self.stages = list(stages)
        self.context = context
        self.outputs = list(outputs) if outputs else None
        self.batches = 0
        self.rows = 0
        self.running = 0
        self.failures = 0
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

    async def _run(self, batch: InboxBatch, trace: BatchTrace | None) -> ResultBatch:
        try:
            if trace is None:
                return await answer(batch, self.stages, self.context, self.outputs)
            with trace.current():  # the stages' and models' spans are the batch span's children
                return await answer(batch, self.stages, self.context, self.outputs, trace=trace)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: B036 - even SystemExit from user code must not end the loop
            self.failures += 1
            logger.exception("answering a batch of %d requests failed; they get an error result", batch.n_rows)
            return failed_batch(batch, e)

    async def _answer(self, batches: list[InboxBatch], metadata: Any) -> None:
        self._retain_refs(metadata)
        prev, turn = self._last_turn, asyncio.get_running_loop().create_future()
        self._last_turn = turn
        self.running += 1
        try:
            started = time.time()
            batch = merge(batches)
            received, requests = arrivals(batches)
            trace = None
            if self.tracer is not None:
                trace = self.tracer.begin(
                    batch.traceparents(), batch.n_rows, sum(requests), started - min(received, default=started)
                )
            result = await self._run(batch, trace)
            answered = time.time()
            if trace is not None:
                result.trace_id = trace.trace_id
                trace.writing()
            if prev is not None and not prev.done():
                await asyncio.wait([prev])
            self.batches += 1
            self.rows += result.n_rows
            pending = self._emit(Answer(result, received, requests, started, answered, trace), metadata=metadata)
            turn.set_result(None)
            if pending:
                await asyncio.gather(*pending)  # the writer's room
        finally:
            self.running -= 1
            if not turn.done():
                turn.set_result(None)
            self._release_refs(metadata)


class WriteResults(Stream):
    """Sink: write the answers, then commit the reads they answer, in the order they come.

    Answers queue here (in bytes, bounded by ``max_bytes``: ``update`` returns a future while more
    waits); one write runs at a time and takes everything queued, so a slow write or commit makes
    the next one bigger, not the reads slower.  Side records (a shadow's results) join the next
    write; when the queue is full they are dropped and counted instead.

    If a write fails nothing later is written or committed and ``on_error(exc)`` is called (the
    runner then stops, and the controller restarts the partition; the uncommitted reads are redone).

    Attributes
    ----------
    written, errors : int
        Requests answered (and, of them, with an error) so far.
    queued_bytes : int
        Bytes of answers waiting to be written (or being written).
    writes : int
        Connector writes so far (each may carry several batches).
    side_dropped : int
        Side records dropped because the queue was full.
    idle : bool
        Nothing waits to be written.
    error : BaseException or None
        The write that failed.
    """

    def __init__(
        self,
        upstream: Stream,
        connector: Connector,
        writer: ResultWriter,
        *,
        max_bytes: int = 64 * 2**20,
        stats: PartitionStats | None = None,
        on_error: Any = None,
        **kwargs: Any,
    ):
        self.connector = connector
        self.writer = writer
        self.max_bytes = max_bytes
        self.stats = stats
        self.on_error = on_error
        self.error: BaseException | None = None
        self.written = 0
        self.writes = 0
        self.queued_bytes = 0
        self.side_dropped = 0
        self._queue: deque[tuple[Answer | None, list[OutMessage], int]] = deque()
        self._task: asyncio.Task | None = None
        self._room: list[asyncio.Future] = []
        super().__init__(upstream, **kwargs)

    @property
    def errors(self) -> int:
        return self.writer.errors

    @property
    def idle(self) -> bool:
        return not self._queue and self._task is None

    def update(self, x: Answer, who: Any = None, metadata: Any = None) -> asyncio.Future | None:
        if self.error is not None:
            return None  # an earlier write failed: nothing after it may be written (the reads are redone)
        self._put(x, self.writer.encode(x.result))
        if self.queued_bytes > self.max_bytes:
            fut = asyncio.get_running_loop().create_future()
            self._room.append(fut)
            return fut
        return None

    def record(self, parts: Sequence[ResultPart]) -> None:
        """Write ``parts`` (results for other topics: a shadow's) with the next write, unless the queue is full."""
        if self.error is not None or not parts:
            return
        if self.queued_bytes > self.max_bytes:
            self.side_dropped += sum(len(p.batch) for p in parts)
            return
        self._put(None, self.writer.encode(ResultBatch(list(parts), [], [])))

    def _put(self, answer: Answer | None, writes: list[OutMessage]) -> None:
        size = sum(len(w.data) for w in writes)
        self._queue.append((answer, writes, size))
        self.queued_bytes += size
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue and self.error is None:
                taken = list(self._queue)
                self._queue.clear()
                writes = [w for _, ws, _ in taken for w in ws]
                reads = [r for a, _, _ in taken if a is not None for r in a.result.reads]
                try:
                    await self.connector.write_and_commit(writes, reads)
                except Exception as e:
                    _end_traces(taken, e)
                    self._failed(e)
                    return
                self.writes += 1
                now = time.time()
                _end_traces(taken)
                for a, _, size in taken:
                    self.queued_bytes -= size
                    if a is None:
                        continue
                    result = a.result
                    self.written += sum(len(p.batch) for p in result.parts if p.target is None) + len(result.rejected)
                    if self.stats is not None:
                        self.stats.record_batch(a.received, a.requests, a.started, a.answered, now, result.n_rows)
                        self.stats.record_errors(result)
                self._wake()
        finally:
            self._task = None
            if self.error is not None:
                self._wake(everyone=True)

    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        _end_traces(self._queue, exc)
        self._queue.clear()
        if not isinstance(exc, PartitionRevoked):
            logger.error("writing results failed, stopping this partition: %s", exc)
        if self.on_error is not None:
            self.on_error(exc)

    def _wake(self, everyone: bool = False) -> None:
        if everyone or self.queued_bytes <= self.max_bytes:
            room, self._room = self._room, []
            for fut in room:
                if not fut.done():
                    fut.set_result(None)


def _end_traces(queued: Any, error: BaseException | None = None) -> None:
    """End the spans of the answers in ``queued`` (``(answer, writes, size)`` items): written, or not (``error``)."""
    for answer_, _, _ in queued:
        if answer_ is not None and answer_.trace is not None:
            answer_.trace.end(error)
