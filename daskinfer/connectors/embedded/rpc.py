"""The client side of the embedded broker's RPC handlers, through a scheduler rpc (``client.scheduler``,
``worker.scheduler``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from daskinfer.connectors.embedded.topics import TopicSettings


class BrokerRPC:
    """Async calls to the embedded broker through a scheduler rpc (``client.scheduler``, ``worker.scheduler``)."""

    def __init__(self, rpc: Any):
        self.rpc = rpc

    async def create_topic(self, name: str, spec: TopicSettings) -> TopicSettings:
        """Create ``name`` with ``spec`` unless it exists; return the topic's settings."""
        return TopicSettings(**(await self.rpc.daskinfer_topic_create(name=name, spec=asdict(spec))))

    async def info(self, topic: str) -> dict[str, Any]:
        return await self.rpc.daskinfer_topic_info(name=topic)

    async def list_topics(self) -> dict[str, dict[str, Any]]:
        return await self.rpc.daskinfer_topic_list()

    async def delete_topic(self, name: str) -> bool:
        return await self.rpc.daskinfer_topic_delete(name=name)

    async def put(self, topic: str, messages: list[tuple[int, bytes]], timeout: float | None = None) -> int:
        return await self.rpc.daskinfer_put(topic=topic, messages=messages, timeout=timeout)

    async def write(self, puts: list, fallback: int = 0, commit: dict | None = None) -> dict[str, Any]:
        return await self.rpc.daskinfer_write(puts=puts, fallback=fallback, commit=commit)

    async def get(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_messages: int,
        timeout: float = 0.0,
        group: str | None = None,
        epoch: int | None = None,
        commit: bool = False,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        return await self.rpc.daskinfer_get(
            topic=topic,
            partition=partition,
            offset=offset,
            max_messages=max_messages,
            timeout=timeout,
            group=group,
            epoch=epoch,
            commit=commit,
            max_bytes=max_bytes,
        )

    async def commit(self, topic: str, partition: int, group: str, offset: int, epoch: int | None = None) -> dict:
        return await self.rpc.daskinfer_commit(
            topic=topic, partition=partition, group=group, offset=offset, epoch=epoch
        )

    async def assign(self, topic: str, partition: int, group: str, epoch: int) -> int:
        return await self.rpc.daskinfer_assign(topic=topic, partition=partition, group=group, epoch=epoch)
