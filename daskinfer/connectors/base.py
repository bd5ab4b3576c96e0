"""What a partition needs from a broker, and what a client needs from it.

A :class:`Connector` serves one inbox partition on the worker that runs it: it reads
raw messages in blocks (:class:`Messages`: no object per message but its bytes), and
writes a batch's results (:class:`OutMessage`) before it commits the reads they
answer.  A :class:`ClientTransport` is the client's side: send requests to inbox
partitions, receive results from the client's reply target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from daskinfer.wire.codec import Encoded

DIRECT_REPLY_PREFIX = "direct:"
"""Reply targets of clients of the direct transport: ``direct:{client id}`` (answers go back over its comm)."""
TOPIC_REPLY_PREFIX = "daskinfer-replies-"
"""Reply targets (topics, streams) that broker transports make for their clients: ``daskinfer-replies-{id}``."""


@dataclass(slots=True)
class Messages:
    """The raw messages of one read of one inbox partition.

    Attributes
    ----------
    payloads : list of bytes or SplitMessage
        The messages, in inbox order (split ones from a transport with ``split_messages``).
    positions : object
        What the connector needs to commit them (an offset range, entry ids...).
    meta : list, optional
        Per message, its metadata, or None when it has none: Kafka headers (name -> bytes) and
        the message key as ``key``; the Redis entry's fields other than ``d``.  ``None``: no
        message has any.  It may mark a message as v2 (KServe) JSON (:mod:`daskinfer.wire.v2json`).
    """

    payloads: Sequence[Encoded]
    positions: Any = None
    meta: list[dict[str, Any] | None] | None = None

    def __len__(self) -> int:
        return len(self.payloads)


class OutMessage(NamedTuple):
    """One message a partition writes."""

    target: str  # a topic/stream: the outbox, the dead-letter topic, or a client's reply target
    key: str | None  # partitioning key (None: the connector picks)
    data: Encoded  # an encoded result, result frame or dead letter (split for ConnectorPlugin.split_reply_prefixes)
    correlation_id: str | None = None  # the request id of a single result (brokers with headers use it)
    headers: tuple[tuple[str, str], ...] = ()  # more headers (Kafka) or entry fields (Redis): a v2 answer's


class PartitionRevoked(Exception):
    """The partition was assigned elsewhere; the partition's runner must stop."""


class Connector:
    """Broker access of one inbox partition.

    Implementations: :class:`daskinfer.connectors.embedded.EmbeddedConnector`,
    :class:`daskinfer.connectors.redis.RedisConnector`.
    """

    async def start(self) -> None:
        """Connect; find the position to resume from."""

    async def read(self, max_messages: int, timeout: float) -> Messages:
        """Up to ``max_messages`` new messages, waiting up to ``timeout`` s for the first.

        Raises :class:`PartitionRevoked` when this runner no longer owns the partition.
        """
        raise NotImplementedError

    async def write_and_commit(self, writes: Sequence[OutMessage], done: Sequence[Messages]) -> None:
        """Write ``writes``, then commit the reads ``done`` (their requests are all answered).

        Raises :class:`PartitionRevoked` when this runner no longer owns the partition (and
        then writes nothing).
        """
        raise NotImplementedError

    async def backlog(self) -> int:
        """Messages waiting in this partition (read or not, not yet committed)."""
        return 0

    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> dict[str, Any]:
        """Figures for the partition's status."""
        return {}


class ClientTransport:
    """What :class:`~daskinfer.InferenceClient` needs from a broker.

    Implementations: :class:`daskinfer.connectors.direct.DirectTransport` (the default),
    :class:`daskinfer.connectors.embedded.EmbeddedTransport`,
    :class:`daskinfer.connectors.redis.RedisTransport`,
    :class:`daskinfer.connectors.kafka.KafkaTransport`.

    Attributes
    ----------
    reply_prefix : str
        How this transport's reply targets begin (a pipeline lets requests name only reply
        targets with the prefixes of its connector's transports).
    uses_scheduler : bool
        It talks to daskinfer's control path on the Dask scheduler (routes, embedded topics):
        :class:`~daskinfer.InferenceClient` installs it there before :meth:`start`.
    split_messages : bool
        It carries :class:`~daskinfer.wire.codec.SplitMessage` payloads (arrays beside the msgpack
        bytes, sent without a copy); otherwise payloads are bytes.
    """

    reply_prefix: ClassVar[str] = TOPIC_REPLY_PREFIX
    uses_scheduler: ClassVar[bool] = False
    split_messages: ClassVar[bool] = False

    def make_reply_target(self, client_id: str) -> str:
        """The reply target of the client ``client_id``."""
        return f"{self.reply_prefix}{client_id}"

    async def start(self, inbox: str, reply_target: str) -> int:
        """Connect, find ``inbox``, open ``reply_target``; return the inbox's partitions."""
        raise NotImplementedError

    async def send(self, inbox: str, items: list[tuple[int, Encoded]]) -> None:
        """Append ``(partition, data)`` requests to the inbox (waits while it is full).

        ``data`` is bytes, or a :class:`~daskinfer.wire.codec.SplitMessage` where :attr:`split_messages`
        says the transport takes them."""
        raise NotImplementedError

    async def receive(self, timeout: float) -> Sequence[Encoded]:
        """Next results on the reply target, waiting up to ``timeout`` s for the first."""
        raise NotImplementedError

    async def ack(self) -> None:
        """Everything :meth:`receive` returned so far is delivered."""

    async def close(self) -> None:
        """Delete the reply target and release connections."""


def partition_for(key: str | None, partitions: int, fallback: int = 0) -> int:
    """The partition of a key (stable across processes); ``fallback`` for no key."""
    if key is None:
        return fallback % partitions
    import zlib

    return zlib.crc32(key.encode()) % partitions
