"""The client side of the embedded broker's topics: put into the inbox topic, read a reply topic.

Use it for producers whose requests must wait in a log while no pipeline runs
(``InferenceClient(transport="topic")``); the default is the direct transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport
from daskinfer.connectors.embedded.rpc import BrokerRPC
from daskinfer.connectors.embedded.topics import TopicSettings
from daskinfer.wire.codec import Encoded, as_bytes

if TYPE_CHECKING:
    from distributed import Client


class EmbeddedTransport(ClientTransport):
    """Put requests into an inbox topic on the scheduler; read results from this client's reply topic.

    Parameters
    ----------
    client : distributed.Client
    read_batch : int, optional
        Most results one read takes; config ``daskinfer.client.read-batch``.
    """

    uses_scheduler = True

    def __init__(self, client: Client, read_batch: int | None = None):
        self.client = client
        self.broker = BrokerRPC(client.scheduler)
        self.read_batch = int(settings.get("client.read-batch", read_batch))
        self.reply_topic: str | None = None
        self._offset = 0

    async def start(self, inbox: str, reply_target: str) -> int:
        # an inbox no pipeline created yet gets the pipelines' default partition count
        inbox_settings = await self.broker.create_topic(inbox, TopicSettings.from_config("inbox"))
        await self.broker.create_topic(reply_target, TopicSettings.from_config("reply", partitions=1))
        await self.broker.assign(reply_target, 0, "client", 1)
        self.reply_topic = reply_target
        return inbox_settings.partitions

    async def send(self, inbox: str, items: list[tuple[int, Encoded]]) -> None:
        await self.broker.put(inbox, [(p, as_bytes(data)) for p, data in items])

    async def receive(self, timeout: float) -> list[bytes]:
        assert self.reply_topic is not None
        # the read commits what the previous one returned (delivered by then)
        reply = await self.broker.get(
            self.reply_topic, 0, self._offset, self.read_batch, timeout=timeout, group="client", epoch=1, commit=True
        )
        if reply.get("deleted"):
            raise ConnectionError(
                f"reply topic {self.reply_topic!r} was deleted (expired: this client did not "
                "read it for longer than daskinfer.broker.reply-ttl)"
            )
        msgs = reply["messages"]
        self._offset = reply["offset"] + len(msgs)
        return msgs

    async def close(self) -> None:
        if self.reply_topic is not None:
            await self.broker.delete_topic(self.reply_topic)
