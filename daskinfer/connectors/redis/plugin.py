"""The Redis Streams connector as a plugin (see :mod:`daskinfer.connectors.registry`).

Light to import: the ``redis`` package (``pip install daskinfer[redis]``) is imported only when a
partition, a deploy or a transport needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daskinfer.connectors.base import ClientTransport, Connector
from daskinfer.connectors.registry import ConnectorPlugin

if TYPE_CHECKING:
    from distributed import Client, Worker


class RedisConnectorPlugin(ConnectorPlugin):
    """``Pipeline(connector="redis", connector_options={"url": ...})``."""

    name = "redis"
    transports = ("redis",)

    def partition(self, spec: Mapping[str, Any], worker: Worker, partition: int, epoch: int) -> Connector:
        from daskinfer.connectors.redis.consumer import RedisConnector

        return RedisConnector(dict(spec), partition, epoch, consumer=f"{worker.address}/{partition}")

    async def prepare(self, client: Client, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The inbox partition streams with the pipeline's group, outbox and dead-letter streams, and a
        new deployment generation (its runners fence any left from an earlier deployment)."""
        from daskinfer.connectors.redis.consumer import prepare_streams

        plain = dict(spec)
        await prepare_streams(plain, timeout=timeout)
        return {**(spec.get("connector_options") or {}), "redis_generation": plain["redis_generation"]}

    def make_transport(self, client: Client, kind: str) -> ClientTransport:
        from daskinfer.connectors.redis.transport import RedisTransport

        return RedisTransport()
