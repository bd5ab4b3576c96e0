"""The Kafka connector as a plugin (see :mod:`daskinfer.connectors.registry`).

Light to import: ``confluent-kafka`` (``pip install daskinfer[kafka]``) is imported only when a
partition, a deploy or a transport needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daskinfer.connectors.base import ClientTransport, Connector
from daskinfer.connectors.registry import ConnectorPlugin

if TYPE_CHECKING:
    from distributed import Client, Worker


class KafkaConnectorPlugin(ConnectorPlugin):
    """``Pipeline(connector="kafka", connector_options={"bootstrap_servers": ...})``."""

    name = "kafka"
    transports = ("kafka",)

    def partition(self, spec: Mapping[str, Any], worker: Worker, partition: int, epoch: int) -> Connector:
        from daskinfer.connectors.kafka.consumer import KafkaConnector

        return KafkaConnector(dict(spec), partition, epoch, consumer=f"{worker.address}/{partition}")

    async def prepare(self, client: Client, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The inbox, outbox and dead-letter topics; settles the options (exactly once where the
        brokers run transactions)."""
        from daskinfer.connectors.kafka.admin import prepare

        plain = {**spec, "connector_options": dict(spec.get("connector_options") or {})}
        await prepare(plain)
        return plain["connector_options"]

    def make_transport(self, client: Client, kind: str) -> ClientTransport:
        from daskinfer.connectors.kafka.transport import KafkaTransport

        return KafkaTransport()
