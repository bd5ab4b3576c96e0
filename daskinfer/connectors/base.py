"""What a partition runner needs from a broker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Envelope:
    """One raw message read from an inbox partition."""

    partition: int
    offset: Any  # an int for the embedded broker, an entry id for Redis
    data: bytes


class PartitionRevoked(Exception):
    """The partition was assigned elsewhere; the runner must stop."""


class Connector:
    """Broker access of one partition runner (inbox partition ``partition``).

    Implementations: :class:`daskinfer.connectors.embedded.EmbeddedConnector`.
    """

    async def start(self) -> None:
        """Connect; find the position to resume from."""

    async def read(self, max_messages: int, timeout: float) -> list[Envelope]:
        """Up to ``max_messages`` new messages, waiting up to ``timeout`` s for the first.

        Raises :class:`PartitionRevoked` when this runner no longer owns the partition.
        """
        raise NotImplementedError

    async def write(self, items: list[tuple[str, str | None, bytes]]) -> None:
        """Append ``(topic, key, data)`` messages (results, dead letters)."""
        raise NotImplementedError

    async def commit(self, envelopes: list[Envelope]) -> None:
        """Mark these messages as done (called once their results are written)."""
        raise NotImplementedError

    async def write_and_commit(self, items: list[tuple[str, str | None, bytes]], envelopes: list[Envelope]) -> None:
        """:meth:`write` then :meth:`commit`; connectors may do both in one round trip."""
        await self.write(items)
        await self.commit(envelopes)

    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> dict[str, Any]:
        return {}


class ClientTransport:
    """What :class:`~daskinfer.InferenceClient` needs from a broker.

    Implementations: :class:`daskinfer.connectors.embedded.EmbeddedTransport`.
    """

    async def start(self, inbox: str, reply_topic: str) -> int:
        """Connect, make sure ``inbox`` exists, open ``reply_topic``; return the inbox's partitions."""
        raise NotImplementedError

    async def send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        """Append ``(partition, data)`` requests to the inbox (waits while it is full)."""
        raise NotImplementedError

    async def receive(self, timeout: float) -> list[bytes]:
        """Next results on the reply topic, waiting up to ``timeout`` s for the first."""
        raise NotImplementedError

    async def ack(self) -> None:
        """Everything :meth:`receive` returned so far is delivered."""

    async def close(self) -> None:
        """Delete the reply topic and release connections."""
