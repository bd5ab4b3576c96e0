"""A partition's view of the embedded connector: direct sends from clients and the inbox topic.

Requests reach a partition two ways: straight from daskinfer clients
(:mod:`daskinfer.connectors.direct`, the default) and through the scheduler-hosted inbox
topic (other producers, ``InferenceClient(transport="topic")``).  A read takes what the
direct queue holds, and what a long-poll of the topic brought; results go back to their
clients over their comms, or to topics (outbox, dead-letter, reply topics).  The topic's
position is committed in the same call that writes its results; a direct send is
"done" once its results are on their way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daskinfer.connectors.base import Connector, Messages, OutMessage, PartitionRevoked
from daskinfer.connectors.direct.endpoint import DirectEndpoint, PartitionQueue
from daskinfer.connectors.direct.protocol import client_of
from daskinfer.connectors.embedded.rpc import BrokerRPC
from daskinfer.wire.codec import Encoded, as_bytes

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EmbeddedPositions:
    """What one read took: direct sends ``(client, seq)`` and a topic offset range."""

    direct: list[tuple[str, int]] = field(default_factory=list)
    topic_end: int | None = None  # first topic offset after this read's topic messages


class EmbeddedConnector(Connector):
    """One inbox partition of the embedded connector.

    Parameters
    ----------
    scheduler_rpc : rpc
        The worker's rpc to the scheduler (the broker).
    endpoint : DirectEndpoint
        This worker's direct endpoint (the partition's queue is opened there at once, so
        clients' sends are accepted while the partition starts).
    inbox, group : str
        Inbox topic and consumer group (the pipeline's name).
    partition, epoch : int
        The partition and the epoch of this assignment (a newer epoch fences this one).
    max_queued_messages, max_queued_bytes : int
        Bounds of the direct queue.
    read_bytes : int
        Most bytes one topic read takes.
    """

    def __init__(
        self,
        scheduler_rpc: Any,
        endpoint: DirectEndpoint,
        inbox: str,
        group: str,
        partition: int,
        epoch: int,
        *,
        max_queued_messages: int,
        max_queued_bytes: int,
        read_bytes: int,
        poll_timeout: float = 0.5,
    ):
        self.broker = BrokerRPC(scheduler_rpc)
        self.endpoint = endpoint
        self.inbox = inbox
        self.group = group
        self.partition = partition
        self.epoch = epoch
        self.read_bytes = read_bytes
        self.poll_timeout = poll_timeout
        self.queue: PartitionQueue = endpoint.open_queue(inbox, partition, max_queued_messages, max_queued_bytes)
        self.position = 0
        self.committed = 0
        self.topic_end = 0
        self.dropped = 0
        self._poll: asyncio.Task | None = None
        self._poll_max = 0
        self._taken: dict[tuple[str, int], None] = {}  # direct sends read and not yet answered
        self._revoked = False

    async def start(self) -> None:
        self.position = await self.broker.assign(self.inbox, self.partition, self.group, self.epoch)
        self.committed = self.position

    def _start_poll(self, max_messages: int) -> None:
        if self._poll is None:
            self._poll = asyncio.ensure_future(
                self.broker.get(
                    self.inbox,
                    self.partition,
                    self.position,
                    max_messages,
                    self.poll_timeout,
                    group=self.group,
                    epoch=self.epoch,
                    max_bytes=self.read_bytes,
                )
            )
            self._poll_max = max_messages

    def _topic_messages(self) -> list[bytes]:
        """What a finished long-poll brought (and advance the read position)."""
        task, self._poll = self._poll, None
        assert task is not None
        reply = task.result()
        if reply.get("revoked"):
            self._revoked = True
            raise PartitionRevoked(f"partition {self.partition} of {self.inbox!r} moved to another runner")
        if reply.get("deleted"):
            return []
        first = reply["offset"]
        if first > self.position:  # cannot happen while subscribed; say so if it does
            logger.warning(
                "partition %d of %r skipped offsets %d..%d", self.partition, self.inbox, self.position, first
            )
        msgs = reply["messages"]
        self.position = first + len(msgs)
        self.topic_end = reply.get("end", self.position)
        return msgs

    async def read(self, max_messages: int, timeout: float) -> Messages:
        if self._revoked:
            raise PartitionRevoked(f"partition {self.partition} of {self.inbox!r} moved to another runner")
        self._start_poll(max_messages)
        poll = self._poll
        assert poll is not None
        if not self.queue.items and not poll.done():
            waiter = asyncio.ensure_future(self.queue.wait(timeout))
            await asyncio.wait([waiter, poll], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        positions = EmbeddedPositions()
        payloads: list[Encoded] = []
        if self._poll is not None and self._poll.done():
            payloads.extend(self._topic_messages())
            positions.topic_end = self.position
        for send in self.queue.take(max(max_messages - len(payloads), 1)) if self.queue.items else ():
            payloads += send.payloads
            positions.direct.append((send.client, send.seq))
            self._taken[(send.client, send.seq)] = None
        return Messages(payloads, positions)

    async def write_and_commit(self, writes: Sequence[OutMessage], done: Sequence[Messages]) -> None:
        by_client: dict[str, list[Encoded]] = {}
        by_topic: dict[str, list[tuple[str | None, bytes]]] = {}
        for w in writes:
            client = client_of(w.target)
            if client is not None:
                by_client.setdefault(client, []).append(w.data)
            else:
                by_topic.setdefault(w.target, []).append((w.key, as_bytes(w.data)))
        topic_end = None
        finished: dict[str, list[int]] = {}
        for m in done:
            pos: EmbeddedPositions = m.positions
            if pos.topic_end is not None:
                topic_end = pos.topic_end
            for client, seq in pos.direct:
                finished.setdefault(client, []).append(seq)
                self._taken.pop((client, seq), None)
        if by_topic or topic_end is not None:
            commit = (
                None
                if topic_end is None
                else {
                    "topic": self.inbox,
                    "partition": self.partition,
                    "group": self.group,
                    "offset": topic_end,
                    "epoch": self.epoch,
                }
            )
            reply = await self.broker.write(list(by_topic.items()), fallback=self.partition, commit=commit)
            if reply["missing"]:
                self.dropped += sum(len(by_topic[t]) for t in reply["missing"])
                logger.info("results for topics %s dropped: the topics are gone (clients that left)", reply["missing"])
            if reply.get("revoked"):
                self._revoked = True
                raise PartitionRevoked(f"partition {self.partition} of {self.inbox!r} moved to another runner")
            if topic_end is not None:
                self.committed = topic_end
        for client in set(by_client) | set(finished):
            if not self.endpoint.deliver(client, by_client.get(client, []), finished.get(client, [])):
                self.dropped += len(by_client.get(client, []))

    async def backlog(self) -> int:
        return self.queue.messages + len(self._taken) + max(self.topic_end - self.committed, 0)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        # what this runner took and did not answer goes back to its clients, as does what it never took
        self.endpoint.close_queue(self.queue, list(self._taken))
        self._taken.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "committed": self.committed,
            "dropped": self.dropped,
            "direct_queued": self.queue.messages,
            "direct_queued_bytes": self.queue.bytes,
            "direct_received": self.queue.received,
            "direct_parked": len(self.queue.parked),
        }
