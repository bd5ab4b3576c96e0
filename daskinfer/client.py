"""The client API: send requests to a pipeline's inbox and get their results.

>>> ic = InferenceClient(client, inbox="requests")         # doctest: +SKIP
>>> ic.submit({"x": row}).result().value()                 # one row   # doctest: +SKIP
>>> ic.predict({"x": block})                               # a block, one message  # doctest: +SKIP

Results come back on a reply topic of this client's own.  Each answer is
delivered once: a result whose request id was already answered (a request
processed twice after a failure) is dropped.
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
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport
from daskinfer.connectors.embedded import EmbeddedTransport, partition_for
from daskinfer.wire.messages import Request, Result, decode_result, new_id

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

_READ_BATCH = 8192


def _as_inputs(inputs: Any) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    return {"x": np.asarray(inputs)}


class InferenceClient:
    """Submit requests to a pipeline's inbox and receive results (sync or async).

    Parameters
    ----------
    client : distributed.Client, optional
        Default: the current client. An asynchronous client makes this client
        asynchronous too (futures are ``asyncio`` futures; use ``await``).
    inbox : str
        The pipeline's inbox topic.
    model : str, optional
        Model named in every request (default: the pipeline's model).
    dedupe_window : int, optional
        Request ids remembered to drop duplicate answers; config ``daskinfer.client.dedupe-window``.
    max_pending : int
        Requests buffered before a sync ``submit`` waits (back-pressure).
    transport : ClientTransport, optional
        The broker to talk to (default: the embedded broker of ``client``'s scheduler);
        e.g. :class:`daskinfer.connectors.redis.RedisTransport`.

    Notes
    -----
    Inputs given as a bare array are sent as the input named ``"x"``; pass a dict
    for other or several input names.
    """

    def __init__(
        self,
        client: Client | None = None,
        inbox: str = "requests",
        *,
        model: str | None = None,
        dedupe_window: int | None = None,
        max_pending: int = 200_000,
        transport: ClientTransport | None = None,
    ):
        if client is None:
            from distributed import default_client

            client = default_client()
        self.client = client
        self.inbox = inbox
        self.model = model
        self.asynchronous = bool(client.asynchronous)
        self.reply_topic = f"daskinfer-replies-{new_id()[:12]}"
        self.dedupe_window = int(settings.get("client.dedupe-window", dedupe_window))
        self.max_pending = max_pending
        self._max_size = settings.get_bytes("codec.max-message-size")
        self.transport: ClientTransport = transport or EmbeddedTransport(client, _READ_BATCH)
        self.duplicates = 0
        self.received = 0
        self._waiters: dict[str, Any] = {}
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._outq: collections.deque[tuple[int, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._flushing = False
        self._rr = itertools.count()
        self._ids = itertools.count()
        self._id_prefix = new_id()[:16] + "-"  # unique per client; a counter makes ids cheap
        self._n_partitions = 0
        self._unclaimed: queue.Queue[Result] = queue.Queue()
        self._aunclaimed: asyncio.Queue[Result] | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._closed = False
        self._error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def _start(self) -> InferenceClient:
        if self._started:
            return self
        self._n_partitions = await self.transport.start(self.inbox, self.reply_topic)
        self._aloop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._aunclaimed = asyncio.Queue()
        self._tasks.append(asyncio.ensure_future(self._receive()))
        self._started = True
        return self

    def start(self):
        """Connect (also done by the first ``submit``)."""
        return self.client.sync(self._start)

    def __await__(self):
        return self._start().__await__()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._started:
            try:
                await self.transport.close()
            except Exception:  # pragma: no cover - scheduler gone
                pass
        err = ConnectionError("InferenceClient closed")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    def close(self):
        """Stop receiving; pending futures fail. Deletes this client's reply topic."""
        return self.client.sync(self._close)

    def __enter__(self) -> InferenceClient:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> InferenceClient:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()

    # -- sending ------------------------------------------------------------------------------
    def _request(self, inputs: Any, batched: bool, key: str | None, model: str | None,
                 deadline: float | None, request_id: str | None) -> Request:
        now = time.time()
        return Request(
            id=request_id or f"{self._id_prefix}{next(self._ids)}",
            inputs=_as_inputs(inputs),
            batched=batched,
            key=key,
            model=model or self.model,
            deadline=None if deadline is None else now + deadline,
            reply_to=self.reply_topic,
            sent_at=now,
        )

    def _ensure_started(self) -> None:
        if not self._started:
            if self.asynchronous:
                raise RuntimeError("await the InferenceClient (or use `async with`) before submitting")
            self.start()
        if self._closed:
            raise RuntimeError("InferenceClient is closed")

    def _enqueue(self, req: Request, waiter: Any) -> None:
        data = req.encode()
        p = partition_for(req.key, self._n_partitions, next(self._rr))
        in_loop = self._in_loop()
        with self._lock:
            if waiter is not None:
                self._waiters[req.id] = waiter
            if not in_loop:
                while len(self._outq) >= self.max_pending and not self._closed:
                    self._room.wait(1.0)
            self._outq.append((p, data))
            kick = not self._flushing
            self._flushing = True
        if kick:
            if in_loop:
                self._tasks.append(asyncio.ensure_future(self._flush()))
            else:
                self._aloop.call_soon_threadsafe(lambda: self._tasks.append(asyncio.ensure_future(self._flush())))

    def _in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    async def _flush(self) -> None:
        try:
            while True:
                with self._lock:
                    n = min(len(self._outq), _READ_BATCH)
                    if n == 0:
                        self._flushing = False
                        return
                    batch = [self._outq.popleft() for _ in range(n)]
                    self._room.notify_all()
                try:
                    await self.transport.send(self.inbox, batch)
                except Exception as e:
                    logger.error("sending %d requests to %r failed: %s", len(batch), self.inbox, e)
                    self._fail_batch(batch, e)
        finally:
            self._tasks = [t for t in self._tasks if not t.done()]

    def _fail_batch(self, batch: list[tuple[int, bytes]], exc: BaseException) -> None:
        from daskinfer.wire.messages import peek_request_fields

        for _, data in batch:
            rid = peek_request_fields(data).get("id")
            fut = self._waiters.pop(rid, None)
            if fut is not None and not fut.done():
                self._set(fut, exc, error=True)

    def _new_waiter(self) -> Any:
        if self.asynchronous:
            return self._aloop.create_future()
        return concurrent.futures.Future()

    def submit(self, inputs: Any, *, key: str | None = None, model: str | None = None,
               deadline: float | None = None, request_id: str | None = None):
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
        self._enqueue(self._request(inputs, False, key, model, deadline, request_id), fut)
        return fut

    def submit_many(self, inputs: Any, *, key: str | None = None, model: str | None = None,
                    deadline: float | None = None, request_id: str | None = None):
        """Send a block of rows as one message (columnar); return a future of its result.

        The result's ``value()`` is the block of outputs (rows first).
        """
        self._ensure_started()
        fut = self._new_waiter()
        self._enqueue(self._request(inputs, True, key, model, deadline, request_id), fut)
        return fut

    def send(self, inputs: Any, *, batched: bool = False, key: str | None = None, model: str | None = None,
             deadline: float | None = None, request_id: str | None = None) -> str:
        """Send without a future; the result arrives through :meth:`results`. Returns the request id."""
        self._ensure_started()
        req = self._request(inputs, batched, key, model, deadline, request_id)
        self._enqueue(req, None)
        return req.id

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
                return

    async def aresults(self, timeout: float | None = None) -> AsyncIterator[Result]:
        """Async :meth:`results`."""
        assert self._aunclaimed is not None
        while True:
            try:
                yield await asyncio.wait_for(self._aunclaimed.get(), timeout)
            except asyncio.TimeoutError:
                return

    def _set(self, fut: Any, value: Any, error: bool = False) -> None:
        if error:
            fut.set_exception(value)
        else:
            fut.set_result(value)

    async def _receive(self) -> None:
        while not self._closed:
            try:
                msgs = await self.transport.receive(timeout=0.25)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # scheduler or broker gone
                if not self._closed:
                    logger.error("receiving results failed: %s", e)
                    self._error = e
                return
            if not msgs:
                continue
            now = time.time()
            for data in msgs:
                try:
                    r = decode_result(data, max_size=self._max_size)
                except Exception as e:  # pragma: no cover - only pipelines write here
                    logger.error("undecodable result on %r: %s", self.reply_topic, e)
                    continue
                self._deliver(r, now)
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
            r.timings["latency"] = now - r.sent_at
        fut = self._waiters.pop(rid, None)
        if fut is None:
            if self.asynchronous and self._aunclaimed is not None:
                self._aunclaimed.put_nowait(r)
            else:
                self._unclaimed.put(r)
        else:
            try:
                fut.set_result(r)
            except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
                pass  # cancelled by the caller

    @property
    def pending(self) -> int:
        """Requests sent whose results have not arrived."""
        return len(self._waiters)
