"""The worker side of the direct transport: client connections and per-partition request queues.

A client opens one comm to each worker it sends to (op ``daskinfer_direct``) and keeps it.
Messages on it are lists of small dicts:

- client -> worker: ``{"op": "send", "i": inbox, "p": partition, "s": seq, "d": [bytes, ...]}``
- worker -> client: ``{"op": "q", "s": [seq, ...]}`` (queued: room for more),
  ``{"op": "m", "s": [seq, ...]}`` (moved: send these to the partition's new owner),
  ``{"op": "r", "d": [bytes, ...], "s": [seq, ...]}`` (results, and the sends now fully answered).

Each partition hosted here has a :class:`PartitionQueue`, bounded in messages and bytes.
A send that does not fit waits (in order) and is acknowledged only when it is queued, so
a client holds at most a few unacknowledged sends per partition: back-pressure reaches
the producer.  When the partition leaves this worker, what it has not taken is answered
"moved", and the client sends it to the new owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed.comm.core import CommClosedError

from daskinfer.connectors.direct.link import CommWriter

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

ENDPOINT = "daskinfer-direct"


class QueuedSend:
    """One send of one client: a few request messages (usually one frame)."""

    __slots__ = ("client", "seq", "payloads", "nbytes")

    def __init__(self, client: str, seq: int, payloads: list[bytes]):
        self.client = client
        self.seq = seq
        self.payloads = payloads
        self.nbytes = sum(len(p) for p in payloads)


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
            self.endpoint.reply(send.client, "m", [send.seq])
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
            self.endpoint.reply(client, "q", seqs)
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


class ClientLink:
    """This worker's connection to one client."""

    def __init__(self, client: str, comm: Any):
        self.client = client
        self.comm = comm
        self.writer = CommWriter(comm)


class DirectEndpoint:
    """Worker extension: accepts clients' connections and holds the queues of the partitions hosted here."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.clients: dict[str, ClientLink] = {}
        self.queues: dict[tuple[str, int], PartitionQueue] = {}
        self.undeliverable = 0  # results for clients no longer connected here
        worker.handlers["daskinfer_direct"] = self.serve

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
            self.reply(client, "m", seqs)

    def deliver(self, client: str, data: list[bytes], done: list[int]) -> bool:
        """Send results (and the sends they complete) to a client; False if it is not connected."""
        link = self.clients.get(client)
        if link is None or link.writer.closed:
            self.undeliverable += len(data)
            return False
        link.writer.send({"op": "r", "d": data, "s": done})
        return True

    def reply(self, client: str, op: str, seqs: list[int]) -> None:
        link = self.clients.get(client)
        if link is not None:
            link.writer.send({"op": op, "s": seqs})

    def connected(self, client: str) -> bool:
        return client in self.clients

    # -- the clients' side -------------------------------------------------------------------
    async def serve(self, comm: Any, client: str) -> None:
        """Handler of ``daskinfer_direct``: read a client's sends until it disconnects."""
        link = ClientLink(client, comm)
        old = self.clients.get(client)
        if old is not None:
            old.writer.close()
        self.clients[client] = link
        logger.debug("client %s connected", client)
        try:
            while True:
                msgs = await comm.read()
                for msg in msgs if isinstance(msgs, (list, tuple)) else [msgs]:
                    if msg.get("op") == "send":
                        self._on_send(client, msg)
        except (CommClosedError, OSError):
            pass
        finally:
            if self.clients.get(client) is link:
                del self.clients[client]
            link.writer.close()
            for q in self.queues.values():  # a gone client's parked sends would only take room
                q.parked = deque(s for s in q.parked if s.client != client)

    def _on_send(self, client: str, msg: dict[str, Any]) -> None:
        seq = msg["s"]
        q = self.queues.get((msg["i"], msg["p"]))
        if q is None:
            self.reply(client, "m", [seq])
            return
        if q.offer(QueuedSend(client, seq, msg["d"])):
            self.reply(client, "q", [seq])

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
