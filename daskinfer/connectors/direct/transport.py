"""The client side of the direct transport (:class:`DirectTransport`).

The client learns from the scheduler which worker owns each partition of the inbox
(and is told when that changes: a long-poll on the controller), keeps one comm per
worker, and sends each partition's requests to its owner (the messages of
:mod:`.protocol`).  It keeps every send until the worker says it is fully answered
(``daskinfer-results``); a send the worker hands back (``daskinfer-moved``: the partition
left it) or that was on a worker whose comm broke is sent again, first, to the
partition's new owner.  Answers that arrive twice are dropped by request id in
:class:`~daskinfer.InferenceClient`, so each request is answered once from the caller's view.

Back-pressure: at most ``window`` sends per partition wait for the worker's
``daskinfer-queued`` acknowledgement, and :meth:`DirectTransport.send` waits while a
partition holds more than that many sends not yet on the wire.

A partition in a crash loop (the routes say so: it stopped ``pipeline.max-restarts`` times
within ``pipeline.restart-window``) answers nothing: its sends, and new ones while it stays
so, are answered here with :class:`~daskinfer.exceptions.PartitionFailedError` results that
name the cause, instead of waiting on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.comm import connect
from distributed.comm.core import CommClosedError

from daskinfer import settings
from daskinfer.connectors.base import DIRECT_REPLY_PREFIX, ClientTransport
from daskinfer.connectors.direct.link import open_stream, post, read_messages
from daskinfer.connectors.direct.protocol import CONNECT_OP, Moved, Queued, Results, Send, client_of
from daskinfer.exceptions import ConfigError, PartitionFailedError
from daskinfer.wire.codec import Encoded
from daskinfer.wire.frames import peek_fields
from daskinfer.wire.result_frames import ErrorColumns, encode_result_frame

if TYPE_CHECKING:
    from distributed import Client
    from distributed.batched import BatchedSend

logger = logging.getLogger(__name__)


_RECONNECT_WAIT = 0.2  # seconds before a worker whose comm failed is tried again


class PipelineNotFoundError(ConfigError, LookupError):
    """No pipeline serves the inbox a client sends to."""


@dataclass(slots=True)
class _HeldSend:
    """A send kept until it is answered: its partition, its messages, and the worker it is on the wire to."""

    partition: int
    payloads: list[Encoded]
    worker: str | None = None  # None: waiting to be sent (again)


@dataclass(slots=True)
class _WorkerLink:
    """The comm to one worker: the stream this client writes, and the task that reads the worker's."""

    address: str
    comm: Any = None
    stream: BatchedSend | None = None
    reader: asyncio.Task | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False


@dataclass(slots=True)
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)  # seqs not on the wire, in send order
    inflight: set[int] = field(default_factory=set)  # on the wire, not yet acknowledged as queued
    owner: str | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.room.set()


class DirectTransport(ClientTransport):
    """Send requests straight to the workers that own their partitions.

    Needs the pipeline controller on the scheduler (:class:`~daskinfer.InferenceClient` installs it).

    Parameters
    ----------
    client : distributed.Client
        The Dask client (its scheduler knows the routes; its security settings open the comms).
    window : int, optional
        Sends per partition awaiting the worker's acknowledgement; config ``daskinfer.direct.window``.
    start_timeout : float, optional
        How long :meth:`start` waits for a pipeline to serve the inbox; config
        ``daskinfer.client.start-timeout``.
    """

    reply_prefix = DIRECT_REPLY_PREFIX
    uses_scheduler = True
    split_messages = True

    def __init__(self, client: Client, *, window: int | None = None, start_timeout: float | str | None = None):
        self.client = client
        self.window = int(settings.get("direct.window", window))
        self.start_timeout = settings.get_seconds("client.start-timeout", start_timeout)
        self.inbox: str | None = None
        self.reply_target: str | None = None
        self.client_id: str | None = None
        self.partitions: list[_PartitionState] = []
        self.sends: dict[int, _HeldSend] = {}  # by seq
        self.links: dict[str, _WorkerLink] = {}
        self.version = -1
        self.resent = 0  # sends handed back (moved) or lost with a worker, and sent again
        self.crashed: dict[int, str] = {}  # partitions in a crash loop -> why
        self._seq = itertools.count()
        self._results: asyncio.Queue[Sequence[Encoded]] = asyncio.Queue()
        self._watcher: asyncio.Task | None = None
        self._down: dict[str, float] = {}  # worker -> when its comm last failed (reconnects wait a little)
        self._closed = False
        self.error: BaseException | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            Results: self._on_results,
            Queued: self._on_queued,
            Moved: self._on_moved,
        }

    # -- routes ---------------------------------------------------------------------------------
    async def _routes(self, timeout: float, version: int | None = None) -> dict[str, Any]:
        return await self.client.scheduler.daskinfer_routes(inbox=self.inbox, version=version, timeout=timeout)

    async def start(self, inbox: str, reply_target: str) -> int:
        """Find the pipeline serving ``inbox`` (waiting up to ``start_timeout``); return its partitions."""
        self.inbox = inbox
        client_id = client_of(reply_target)
        self.client_id = reply_target if client_id is None else client_id
        self.reply_target = self.make_reply_target(self.client_id)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.start_timeout
        routes = await self._routes(0)
        while routes.get("pipeline") is None:
            left = end - loop.time()
            if left <= 0:
                raise PipelineNotFoundError(
                    f"no pipeline serves inbox {inbox!r} (waited {self.start_timeout:g}s); deploy one with "
                    f"deploy_pipeline(client, Pipeline(..., inbox={inbox!r})); running pipelines serve "
                    f"{routes.get('inboxes') or 'no inbox'}"
                )
            routes = await self._routes(min(left, 1.0), routes.get("version"))
        self.partitions = [_PartitionState() for _ in range(routes["partitions"])]
        self._apply(routes)
        self._watcher = asyncio.ensure_future(self._watch())
        return routes["partitions"]

    def _apply(self, routes: dict[str, Any]) -> None:
        self.version = routes["version"]
        if routes.get("partitions") != len(self.partitions) and routes.get("pipeline") is not None:
            logger.warning(
                "pipeline of inbox %r now has %s partitions, this client was started with %d",
                self.inbox,
                routes.get("partitions"),
                len(self.partitions),
            )
        owners = routes.get("owners") or {}
        moved: list[int] = []
        for p, state in enumerate(self.partitions):
            owner = owners.get(p, owners.get(str(p)))
            if state.owner is not None and owner != state.owner:
                # the partition left its worker: what went there unanswered goes again to the new owner (the
                # old one may still answer it while it drains: the client drops the second answer)
                moved += [seq for seq, s in self.sends.items() if s.partition == p and s.worker == state.owner]
            state.owner = owner
        if moved:
            self._resend(moved)
        self.crashed = {int(p): str(why) for p, why in (routes.get("crashed") or {}).items()}
        if self.crashed:
            self._answer_crashed([seq for seq, s in self.sends.items() if s.partition in self.crashed])
        for p in range(len(self.partitions)):
            self._pump(p)

    def _answer_crashed(self, seqs: list[int]) -> None:
        """Answer the requests of ``seqs`` (sends to partitions in a crash loop) with the cause."""
        frames = []
        for seq in seqs:
            held = self.sends.pop(seq, None)
            if held is None:
                continue
            p = held.partition
            state = self.partitions[p]
            state.inflight.discard(seq)
            if seq in state.pending:
                state.pending.remove(seq)
            state.room.set()
            why = self.crashed[p]
            for data in held.payloads:
                fields = peek_fields(data)
                ids = fields.get("ids") or ([fields["id"]] if isinstance(fields.get("id"), str) else [])
                if ids:
                    n = len(ids)
                    frames.append(
                        encode_result_frame(
                            [], None, errors=ErrorColumns(ids, [PartitionFailedError.__name__] * n, [why] * n, None)
                        )
                    )
        if frames:
            self._results.put_nowait(frames)

    def _fail(self, exc: BaseException) -> None:
        """Nothing more can be answered: the client's pending requests fail with ``exc``."""
        if not self._closed and self.error is None:
            logger.error("%s", exc)
            self.error = exc
            self._results.put_nowait([])
            for state in self.partitions:
                state.room.set()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        gone_since: float | None = None
        while not self._closed:
            try:
                routes = await self._routes(min(5.0, self.start_timeout), self.version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the scheduler is gone: nothing more can be routed
                self._fail(ConnectionError(f"lost the routes of inbox {self.inbox!r}: {e}"))
                return
            if routes.get("pipeline") is None:
                # stopped: a pipeline deployed again soon takes over; past start_timeout, requests fail
                gone_since = loop.time() if gone_since is None else gone_since
                if self.sends and loop.time() - gone_since > self.start_timeout:
                    self._fail(
                        PipelineNotFoundError(
                            f"the pipeline of inbox {self.inbox!r} stopped and none took its place within "
                            f"{self.start_timeout:g}s; {len(self.sends)} sends of requests are unanswered"
                        )
                    )
                    return
            else:
                gone_since = None
            if routes["version"] != self.version:
                self._apply(routes)

    # -- sending -------------------------------------------------------------------------------
    async def send(self, inbox: str, items: list[tuple[int, Encoded]]) -> None:
        """Queue ``(partition, data)`` messages, one send per partition; wait while a partition is backed up."""
        by_part: dict[int, list[Encoded]] = {}
        n = len(self.partitions)
        for p, data in items:
            by_part.setdefault(p % n, []).append(data)
        for p, payloads in by_part.items():
            state = self.partitions[p]
            if self.error is not None:
                raise self.error
            while len(state.pending) >= self.window and not self._closed and self.error is None:
                state.room.clear()
                await state.room.wait()
            seq = next(self._seq)
            self.sends[seq] = _HeldSend(p, payloads)
            if p in self.crashed:
                self._answer_crashed([seq])
                continue
            state.pending.append(seq)
            self._pump(p)

    def _pump(self, p: int) -> None:
        """Put partition ``p``'s pending sends on the wire to its owner, within the window."""
        state = self.partitions[p]
        owner = state.owner
        if owner is None or not state.pending:
            return
        link = self.links.get(owner)
        if link is None or link.failed:
            down = self._down.get(owner)
            if down is not None and asyncio.get_running_loop().time() - down < _RECONNECT_WAIT:
                return  # _retry pumps again
            link = self._connect(owner)
        if not link.ready.is_set():
            return  # _connect pumps again once connected
        assert link.stream is not None and self.inbox is not None
        while state.pending and len(state.inflight) < self.window:
            seq = state.pending.popleft()
            held = self.sends.get(seq)
            if held is None:
                continue
            held.worker = owner
            state.inflight.add(seq)
            if not post(link.stream, Send(self.inbox, p, seq, held.payloads)):
                # the comm closed and its reader has not said so yet: this send goes again with the others
                self._lost(link, CommClosedError(f"comm to {owner} closed"))
                return
        if len(state.pending) < self.window:
            state.room.set()

    def _connect(self, address: str) -> _WorkerLink:
        link = _WorkerLink(address)
        self.links[address] = link
        link.reader = asyncio.ensure_future(self._serve_link(link))
        return link

    async def _serve_link(self, link: _WorkerLink) -> None:
        try:
            comm = await connect(link.address, **self.client.connection_args)
            await comm.write({"op": CONNECT_OP, "client": self.client_id, "reply": False})
            link.comm = comm
            link.stream = open_stream(comm)  # a failed write aborts the comm: the read below then fails
            link.ready.set()
            for p, state in enumerate(self.partitions):
                if state.owner == link.address:
                    self._pump(p)
            handlers = self._handlers
            async for message in read_messages(comm):
                handlers[type(message)](message)
        except asyncio.CancelledError:
            raise
        except (CommClosedError, OSError, Exception) as e:  # noqa: B014 - any failure loses the link
            self._lost(link, e)

    def _on_results(self, msg: Results) -> None:
        if msg.data:
            self._results.put_nowait(msg.data)
        for seq in msg.seqs:
            held = self.sends.pop(seq, None)
            if held is not None:
                self.partitions[held.partition].inflight.discard(seq)

    def _on_queued(self, msg: Queued) -> None:
        touched = set()
        for seq in msg.seqs:
            held = self.sends.get(seq)
            if held is not None:
                self.partitions[held.partition].inflight.discard(seq)
                touched.add(held.partition)
        for p in touched:
            self._pump(p)

    def _on_moved(self, msg: Moved) -> None:
        self._resend(msg.seqs)

    def _resend(self, seqs: Iterable[int]) -> None:
        """Put sends back at the head of their partitions' queues (oldest first)."""
        touched: dict[int, list[int]] = {}
        for seq in seqs:
            held = self.sends.get(seq)
            if held is None or held.worker is None:
                continue  # answered, or already waiting to be sent
            held.worker = None
            self.partitions[held.partition].inflight.discard(seq)
            touched.setdefault(held.partition, []).append(seq)
        for p, ss in touched.items():
            state = self.partitions[p]
            state.pending.extendleft(sorted(ss, reverse=True))
            self.resent += len(ss)
            self._pump(p)

    def _lost(self, link: _WorkerLink, exc: BaseException) -> None:
        if link.failed:
            return
        link.failed = True
        link.ready.clear()
        if self.links.get(link.address) is link:
            del self.links[link.address]
        if link.stream is not None:
            link.stream.abort()
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._down[link.address] = loop.time()
        loop.call_later(_RECONNECT_WAIT, self._retry)
        logger.info(
            "connection to worker %s lost (%s); its unanswered requests will go to the new owners", link.address, exc
        )
        self._resend([seq for seq, s in self.sends.items() if s.worker == link.address])

    def _retry(self) -> None:
        if not self._closed:
            for p in range(len(self.partitions)):
                self._pump(p)

    # -- receiving -----------------------------------------------------------------------------
    async def receive(self, timeout: float) -> list[Encoded]:
        if self.error is not None:
            raise self.error
        try:
            out = list(await asyncio.wait_for(self._results.get(), timeout))
        except asyncio.TimeoutError:
            return []
        while not self._results.empty():
            out.extend(self._results.get_nowait())
        if self.error is not None and not out:
            raise self.error
        return out

    @property
    def unanswered(self) -> int:
        """Sends kept until answered."""
        return len(self.sends)

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for link in list(self.links.values()):
            if link.reader is not None:
                link.reader.cancel()
            if link.stream is not None:
                link.stream.abort()  # what is not written yet was for requests that now fail anyway
            elif link.comm is not None:
                link.comm.abort()
        self.links.clear()
        for state in self.partitions:
            state.room.set()
