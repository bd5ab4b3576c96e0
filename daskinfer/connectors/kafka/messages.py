"""The columnar connector interface the Kafka connector is written against.

``Messages`` (one read of one inbox partition, no object per message) and ``OutMessage``
(one message to write) are the target form of :mod:`daskinfer.connectors.base`; they live
here until ``base`` has them, and :class:`~daskinfer.connectors.kafka.consumer.KafkaConnector`
adapts them to today's ``Envelope`` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(slots=True)
class Messages:
    """Raw messages of one read of one inbox partition.

    ``positions`` is what the connector needs to commit them: for Kafka the offsets
    ``(first, last)`` of the read (offsets in between may be absent: transaction markers).
    """

    payloads: list[bytes]
    positions: Any = None

    def __len__(self) -> int:
        return len(self.payloads)


class OutMessage(NamedTuple):
    """One message to write: a result, a result frame or a dead letter (opaque bytes)."""

    target: str  # topic: the outbox, the dead-letter topic, or a client's reply topic
    key: str | None  # partitioning key (None: the connector picks)
    data: bytes
    correlation_id: str | None = None  # request id of a single result (a Kafka header)
