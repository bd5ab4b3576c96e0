"""The client API (:class:`InferenceClient`): lifecycle, submit/predict/send/results, futures.

By default requests go straight to the workers that own their partitions and results
come straight back (:mod:`daskinfer.connectors.direct`); the scheduler is not in the data
path.  Single rows flushed together to one partition travel as one columnar frame
(:mod:`daskinfer.client.outgoing`).  Each answer is delivered once: a result whose request
id was already answered (a request processed twice after a failure or a move) is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from daskinfer import config_check, settings, tracing
from daskinfer.client.outgoing import OutgoingQueue, OutgoingRequest, as_inputs
from daskinfer.connectors.base import ClientTransport, partition_for
from daskinfer.connectors.registry import transport_connector
from daskinfer.control.install import ensure_control_async
from daskinfer.exceptions import TopicFullError
from daskinfer.wire.messages import Result, new_id
from daskinfer.wire.result_frames import decode_results

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


def _make_transport(client: Client, transport: ClientTransport | str | None) -> ClientTransport:
    """A transport instance, or the one the connector that has transport kind ``transport`` makes."""
    if isinstance(transport, ClientTransport):
        return transport
    kind = str(settings.get("client.transport", transport))
    return transport_connector(kind).make_transport(client, kind)


class InferenceClient:
    """Submit requests to a pipeline and receive results (sync or async).

    Parameters
    ----------
    client : distributed.Client, optional
        Default: the current client. An asynchronous client makes this client
        asynchronous too (futures are ``asyncio`` futures; use ``await``).
    inbox : str
        The pipeline's inbox.
    model : str, optional
        Model named in every request (default: the pipeline's model).
    dedupe_window : int, optional
        Request ids remembered to drop duplicate answers; config ``daskinfer.client.dedupe-window``.
    max_pending : int, optional
        Requests sent and not yet answered before a sync ``submit`` waits (an async one raises
        :class:`~daskinfer.exceptions.TopicFullError`); config ``daskinfer.client.max-pending``.
    transport : {"direct", "topic"} or ClientTransport, optional
        ``"direct"``: straight to the workers (the default, config ``daskinfer.client.transport``);
        ``"topic"``: through the scheduler's inbox topic (requests wait in a log while no
        pipeline runs); or another broker, e.g. :class:`daskinfer.connectors.redis.RedisTransport`.

    Notes
    -----
    Inputs given as a bare array are sent as the input named ``"x"``; a pipeline whose model
    has one input of another name maps it.  Pass a dict for several inputs.
    """

    def __init__(
        self,
        client: Client | None = None,
        inbox: str = "requests",
        *,
        model: str | None = None,
        dedupe_window: int | None = None,
        max_pending: int | None = None,
        transport: ClientTransport | str | None = None,
    ):
        if client is None:
            from distributed import default_client

            client = default_client()
        config_check.warn_unknown()  # keys dask.config.set added since import
        self.client = client
        self.inbox = inbox
        self.model = model
        self.asynchronous = bool(client.asynchronous)
        self.transport: ClientTransport = _make_transport(client, transport)
        self.reply_target = self.transport.make_reply_target(new_id()[:16])
        self.dedupe_window = int(settings.get("client.dedupe-window", dedupe_window))
        self.max_pending = int(settings.get("client.max-pending", max_pending))
        self.max_unclaimed = int(settings.get("client.max-unclaimed"))
        self._tracing = tracing.enabled()  # send the caller's span context with each request (daskinfer.tracing)
        self._max_size = settings.get_bytes("codec.max-message-size")
        self.duplicates = 0
        self.received = 0
        self.unclaimed_dropped = 0
        self._waiters: dict[str, Any] = {}
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._outgoing = OutgoingQueue(
            self.transport,
            inbox,
            self.reply_target,
            self._lock,
            self._fail_ids,
            flush_batch=int(settings.get("client.flush-batch")),
            frame_requests=int(settings.get("client.max-frame-requests")),
        )
        self._rr = itertools.count()
        self._ids = itertools.count()
        self._id_prefix = new_id()[:16] + "-"  # unique per client; a counter makes ids cheap
        self._n_partitions = 0
        self._unclaimed: queue.Queue[Result] = queue.Queue(self.max_unclaimed)
        self._aunclaimed: asyncio.Queue[Result] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def _start(self) -> InferenceClient:
        if self._started:
            return self
        if self.transport.uses_scheduler:
            await ensure_control_async(self.client)
        self._n_partitions = await self.transport.start(self.inbox, self.reply_target)
        self._aloop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._aunclaimed = asyncio.Queue(self.max_unclaimed)
        self._spawn(self._receive())
        self._started = True
        return self

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self):
        """Connect (also done by the first ``submit``); raises if no pipeline serves the inbox."""
        return self.client.sync(self._start)

    def __await__(self):
        return self._start().__await__()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._started:
            try:
                await self.transport.close()
            except Exception:  # pragma: no cover - scheduler gone
                pass
        self._fail_pending(ConnectionError("InferenceClient closed"))
        with self._lock:
            self._room.notify_all()

    def close(self):
        """Stop receiving; pending futures fail. Deletes this client's reply target."""
        return self.client.sync(self._close)

    async def aclose(self) -> None:
        """Asynchronous :meth:`close`."""
        await self._close()

    def __enter__(self) -> InferenceClient:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> InferenceClient:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()

    def _fail_pending(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            self._set(fut, exc, error=True)

    # -- sending ------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self.error is not None:
            raise ConnectionError(f"InferenceClient stopped receiving results: {self.error}") from self.error
        if self._closed:
            raise RuntimeError("InferenceClient is closed")
        if not self._started:
            if self.asynchronous:
                raise RuntimeError("await the InferenceClient (or use `async with`) before submitting")
            self.start()

    def _enqueue(
        self,
        inputs: Any,
        batched: bool,
        key: str | None,
        model: str | None,
        deadline: float | None,
        request_id: str | None,
        waiter: Any,
    ) -> str:
        now = time.time()
        rid = request_id or f"{self._id_prefix}{next(self._ids)}"
        p = partition_for(key, self._n_partitions, next(self._rr))
        req = OutgoingRequest(
            p,
            rid,
            as_inputs(inputs, batched),
            batched,
            key,
            model or self.model,
            None if deadline is None else now + deadline,
            now,
            tracing.current_traceparent() if self._tracing else None,
        )
        in_loop = self._in_loop()
        with self._lock:
            if len(self._waiters) + len(self._outgoing) >= self.max_pending:
                if in_loop:  # an event loop must not block: the caller gets back-pressure as an error
                    raise TopicFullError(
                        f"InferenceClient holds {self.max_pending} unanswered requests (max_pending); retry later"
                    )
                while len(self._waiters) + len(self._outgoing) >= self.max_pending and not self._closed:
                    self._room.wait(1.0)
            if waiter is not None:
                self._waiters[rid] = waiter
            start_flush = self._outgoing.append(req)
        if start_flush:
            if in_loop:
                self._spawn(self._outgoing.flush())
            else:
                self._aloop.call_soon_threadsafe(self._spawn, self._outgoing.flush())
        return rid

    def _in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _fail_ids(self, ids: list[str], exc: BaseException) -> None:
        for rid in ids:
            fut = self._waiters.pop(rid, None)
            if fut is not None:
                self._set(fut, exc, error=True)
        with self._lock:
            self._room.notify_all()

    def _new_waiter(self) -> Any:
        if self.asynchronous:
            return self._aloop.create_future()
        return concurrent.futures.Future()

    def submit(
        self,
        inputs: Any,
        *,
        key: str | None = None,
        model: str | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ):
        """Send one row; return a future of its :class:`~daskinfer.Result`.

        Parameters
        ----------
        inputs : dict of str to array, or array
            One row: arrays without the row dimension.
        key : str, optional
            Partitioning key; results of the same key come back in order.
        model : str, optional
            Model to run (default: the client's or the pipeline's).
        deadline : float, optional
            Seconds from now after which the request is answered with a deadline error.
        request_id : str, optional
            Id of the request (default: a new unique id).
        """
        self._ensure_started()
        fut = self._new_waiter()
        self._enqueue(inputs, False, key, model, deadline, request_id, fut)
        return fut

    def submit_many(
        self,
        inputs: Any,
        *,
        key: str | None = None,
        model: str | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ):
        """Send a block of rows as one request (columnar); return a future of its result.

        The result's ``value()`` is the block of outputs (rows first).
        """
        self._ensure_started()
        fut = self._new_waiter()
        self._enqueue(inputs, True, key, model, deadline, request_id, fut)
        return fut

    def send(
        self,
        inputs: Any,
        *,
        batched: bool = False,
        key: str | None = None,
        model: str | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> str:
        """Send without a future; the result arrives through :meth:`results`. Returns the request id."""
        self._ensure_started()
        return self._enqueue(inputs, batched, key, model, deadline, request_id, None)

    def predict(self, inputs: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """Send a block and wait for its outputs (raises :class:`~daskinfer.ResultError` on failure)."""
        if self.asynchronous:
            return self._apredict(inputs, timeout=timeout, **kwargs)
        timeout = settings.get_seconds("client.result-timeout", timeout)
        return self.submit_many(inputs, **kwargs).result(timeout).value()

    async def _apredict(self, inputs: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        timeout = settings.get_seconds("client.result-timeout", timeout)
        return (await asyncio.wait_for(self.submit_many(inputs, **kwargs), timeout)).value()

    # -- receiving ---------------------------------------------------------------------------
    def results(self, timeout: float | None = None) -> Iterator[Result]:
        """Results of requests sent with :meth:`send`, as they arrive (stops after ``timeout`` s idle)."""
        while True:
            try:
                yield self._unclaimed.get(timeout=timeout)
            except queue.Empty:
                if self.error is not None:
                    raise ConnectionError(f"InferenceClient stopped receiving results: {self.error}") from self.error
                return

    async def aresults(self, timeout: float | None = None) -> AsyncIterator[Result]:
        """Async :meth:`results`."""
        assert self._aunclaimed is not None
        while True:
            try:
                yield await asyncio.wait_for(self._aunclaimed.get(), timeout)
            except asyncio.TimeoutError:
                return

    @staticmethod
    def _set(fut: Any, value: Any, error: bool = False) -> None:
        try:
            if error:
                fut.set_exception(value)
            else:
                fut.set_result(value)
        except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
            pass  # cancelled by the caller

    async def _receive(self) -> None:
        while not self._closed:
            try:
                msgs = await self.transport.receive(timeout=0.25)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # scheduler, worker or broker gone: nothing more will come
                if not self._closed:
                    logger.error("receiving results failed: %s", e)
                    self.error = e
                    self._fail_pending(ConnectionError(f"InferenceClient stopped receiving results: {e}"))
                    with self._lock:
                        self._room.notify_all()
                return
            if not msgs:
                continue
            now = time.time()
            for data in msgs:
                try:
                    results = decode_results(data, max_size=self._max_size).results()
                except Exception as e:  # pragma: no cover - only pipelines write here
                    logger.error("undecodable result on %r: %s", self.reply_target, e)
                    continue
                for r in results:
                    self._deliver(r, now)
            with self._lock:
                self._room.notify_all()
            await self.transport.ack()

    def _deliver(self, r: Result, now: float) -> None:
        rid = r.id
        seen = self._seen
        if rid in seen:
            self.duplicates += 1
            return
        seen[rid] = None
        if len(seen) > self.dedupe_window:
            seen.popitem(last=False)
        self.received += 1
        if r.sent_at is not None:
            r.latency = now - r.sent_at
        fut = self._waiters.pop(rid, None)
        if fut is not None:
            self._set(fut, r)
            return
        q = self._aunclaimed if self.asynchronous else self._unclaimed
        assert q is not None
        while True:
            try:
                q.put_nowait(r)
                return
            except (queue.Full, asyncio.QueueFull):
                try:  # nobody reads results(): keep the newest, count what is dropped
                    q.get_nowait()
                    self.unclaimed_dropped += 1
                except (queue.Empty, asyncio.QueueEmpty):  # pragma: no cover - a reader just took one
                    pass

    @property
    def pending(self) -> int:
        """Requests with a future whose results have not arrived."""
        return len(self._waiters)

    @property
    def queued(self) -> int:
        """Requests not yet handed to the transport (bounded by ``max_pending``)."""
        return len(self._outgoing)
