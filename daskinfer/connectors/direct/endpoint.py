"""The worker side of the direct transport: client connections and per-partition request queues.

A client opens one comm to each worker it sends to (op ``daskinfer_direct``) and keeps it;
the messages on it are those of :mod:`.protocol`.  The worker reads a client's stream
with its own ``handle_stream``, which hands each :class:`~.protocol.Send` to the
``daskinfer-send`` stream handler, and writes back on a
:class:`~distributed.batched.BatchedSend` (:mod:`.link`).

Each partition hosted here has a :class:`PartitionQueue`, bounded in messages and bytes.
A send that does not fit waits (in order) and is acknowledged (``daskinfer-queued``) only
when it is queued, so a client holds at most a few unacknowledged sends per partition:
back-pressure reaches the producer.  When the partition leaves this worker, what it has
not taken is answered ``daskinfer-moved``, and the client sends it to the new owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daskinfer.connectors.direct.link import open_stream, post
from daskinfer.connectors.direct.protocol import CONNECT_OP, Message, Moved, Queued, Results, Send
from daskinfer.wire.codec import Encoded

if TYPE_CHECKING:
    from distributed import Worker
    from distributed.batched import BatchedSend

logger = logging.getLogger(__name__)

ENDPOINT = "daskinfer-direct"


@dataclass(slots=True)
class QueuedSend:
    """One send of one client, held here: a few request messages (usually one frame)."""

    client: str
    seq: int
    payloads: Sequence[Encoded]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(len(p) for p in self.payloads)


class PartitionQueue:
    """Requests waiting for one partition on this worker, bounded in messages and bytes.

    Parameters
    ----------
    inbox : str
    partition : int
    max_messages, max_bytes : int
        Bounds; a send that does not fit waits and is acknowledged once it is queued.
    endpoint : DirectEndpoint
        Where acknowledgements go.
    """

    def __init__(self, inbox: str, partition: int, max_messages: int, max_bytes: int, endpoint: DirectEndpoint):
        self.inbox = inbox
        self.partition = partition
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.endpoint = endpoint
        self.items: deque[QueuedSend] = deque()
        self.parked: deque[QueuedSend] = deque()
        self.messages = 0
        self.bytes = 0
        self.closed = False
        self.received = 0
        self._data = asyncio.Event()

    def _fits(self, send: QueuedSend) -> bool:
        if not self.items:
            return True  # one send always fits an empty queue
        return self.messages + len(send.payloads) <= self.max_messages and self.bytes + send.nbytes <= self.max_bytes

    def offer(self, send: QueuedSend) -> bool:
        """Queue ``send`` if it fits (and nothing waits before it); else park it. True if queued."""
        if self.closed:
            self.endpoint.post(send.client, Moved([send.seq]))
            return False
        if not self.parked and self._fits(send):
            self._push(send)
            return True
        self.parked.append(send)
        return False

    def _push(self, send: QueuedSend) -> None:
        self.items.append(send)
        self.messages += len(send.payloads)
        self.bytes += send.nbytes
        self.received += len(send.payloads)
        self._data.set()

    def take(self, max_messages: int) -> list[QueuedSend]:
        """The oldest queued sends, up to ``max_messages`` messages (at least one send)."""
        out: list[QueuedSend] = []
        n = 0
        while self.items and (not out or n + len(self.items[0].payloads) <= max_messages):
            s = self.items.popleft()
            out.append(s)
            n += len(s.payloads)
            self.messages -= len(s.payloads)
            self.bytes -= s.nbytes
        if not self.items:
            self._data.clear()
        admitted: dict[str, list[int]] = {}
        while self.parked and self._fits(self.parked[0]):
            s = self.parked.popleft()
            self._push(s)
            admitted.setdefault(s.client, []).append(s.seq)
        for client, seqs in admitted.items():
            self.endpoint.post(client, Queued(seqs))
        return out

    async def wait(self, timeout: float) -> bool:
        """Wait until something is queued (or ``timeout`` s); True if something is."""
        if self.items:
            return True
        try:
            await asyncio.wait_for(self._data.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return bool(self.items)

    def close(self) -> list[QueuedSend]:
        """Stop taking sends; return what was queued or parked (to be answered "moved")."""
        self.closed = True
        left = list(self.items) + list(self.parked)
        self.items.clear()
        self.parked.clear()
        self.messages = self.bytes = 0
        self._data.set()
        return left


@dataclass(slots=True)
class ClientLink:
    """This worker's connection to one client: the stream it writes to."""

    client: str
    stream: BatchedSend


class DirectEndpoint:
    """Worker extension: accepts clients' connections and holds the queues of the partitions hosted here."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.clients: dict[str, ClientLink] = {}
        self.queues: dict[tuple[str, int], PartitionQueue] = {}
        self.undeliverable = 0  # results for clients no longer connected here
        worker.handlers[CONNECT_OP] = self.serve
        worker.stream_handlers[Send.op] = self._on_send

    # -- the partitions' side -------------------------------------------------------------
    def open_queue(self, inbox: str, partition: int, max_messages: int, max_bytes: int) -> PartitionQueue:
        """The queue of a partition that starts here (replacing one left by an earlier runner)."""
        old = self.queues.get((inbox, partition))
        q = PartitionQueue(inbox, partition, max_messages, max_bytes, self)
        self.queues[(inbox, partition)] = q
        if old is not None:  # hand over what the old runner had not taken
            for s in old.close():
                q.offer(s)
        return q

    def close_queue(self, queue: PartitionQueue, untaken: Sequence[tuple[str, int]] = ()) -> None:
        """The partition leaves this worker: whatever it has not answered goes back to its clients."""
        if self.queues.get((queue.inbox, queue.partition)) is queue:
            del self.queues[(queue.inbox, queue.partition)]
        moved: dict[str, list[int]] = {}
        for s in queue.close():
            moved.setdefault(s.client, []).append(s.seq)
        for client, seq in untaken:
            moved.setdefault(client, []).append(seq)
        for client, seqs in moved.items():
            self.post(client, Moved(seqs))

    def deliver(self, client: str, data: list[Encoded], done: list[int]) -> bool:
        """Send results (and the sends they complete) to a client; False if it is not connected."""
        if self.post(client, Results(data, done)):
            return True
        self.undeliverable += len(data)
        return False

    def post(self, client: str, message: Message) -> bool:
        """Queue ``message`` for ``client``; False if it is not connected here."""
        link = self.clients.get(client)
        return link is not None and post(link.stream, message)

    def connected(self, client: str) -> bool:
        return client in self.clients

    # -- the clients' side -------------------------------------------------------------------
    async def serve(self, comm: Any, client: str) -> None:
        """Handler of ``daskinfer_direct``: read a client's stream until it disconnects."""
        link = ClientLink(client, open_stream(comm))
        old = self.clients.get(client)
        if old is not None:  # the client reconnected before this worker saw its old comm close
            old.stream.abort()
        self.clients[client] = link
        logger.debug("client %s connected", client)
        try:
            await self.worker.handle_stream(comm, extra={"client": client})
        finally:
            if self.clients.get(client) is link:
                del self.clients[client]
            link.stream.abort()
            for q in self.queues.values():  # a gone client's parked sends would only take room
                q.parked = deque(s for s in q.parked if s.client != client)

    def _on_send(self, client: str, **fields: Any) -> None:
        """Stream handler of ``daskinfer-send`` (``client`` comes from :meth:`serve`)."""
        send = Send(**fields)
        q = self.queues.get((send.inbox, send.partition))
        if q is None:
            self.post(client, Moved([send.seq]))
            return
        if q.offer(QueuedSend(client, send.seq, send.data)):
            self.post(client, Queued([send.seq]))

    def describe(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "queues": {
                f"{i}/{p}": {"messages": q.messages, "bytes": q.bytes, "parked": len(q.parked)}
                for (i, p), q in self.queues.items()
            },
            "undeliverable": self.undeliverable,
        }


def endpoint_for(worker: Worker) -> DirectEndpoint:
    """The worker's endpoint (made on first use)."""
    ep = worker.extensions.get(ENDPOINT)
    if ep is None:
        ep = worker.extensions[ENDPOINT] = DirectEndpoint(worker)
    return ep
