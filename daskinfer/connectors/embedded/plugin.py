"""The embedded connector as a plugin (see :mod:`daskinfer.connectors.registry`): inbox topics on
the Dask scheduler, reached by clients straight at the workers (``direct``) or through the topic
(``topic``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daskinfer.connectors.base import DIRECT_REPLY_PREFIX, TOPIC_REPLY_PREFIX, ClientTransport, Connector
from daskinfer.connectors.direct.endpoint import endpoint_for
from daskinfer.connectors.direct.transport import DirectTransport
from daskinfer.connectors.embedded.connector import EmbeddedConnector
from daskinfer.connectors.embedded.rpc import BrokerRPC
from daskinfer.connectors.embedded.topics import TopicSettings
from daskinfer.connectors.embedded.transport import EmbeddedTransport
from daskinfer.connectors.registry import ConnectorPlugin
from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from distributed import Client, Worker


class EmbeddedConnectorPlugin(ConnectorPlugin):
    """``Pipeline(connector="embedded")``, the default: needs nothing but the Dask cluster."""

    name = "embedded"
    routed = True
    reply_prefixes = (DIRECT_REPLY_PREFIX, TOPIC_REPLY_PREFIX)
    split_reply_prefixes = (DIRECT_REPLY_PREFIX,)  # the direct transport's comms carry split messages
    transports = ("direct", "topic")

    def partition(self, spec: Mapping[str, Any], worker: Worker, partition: int, epoch: int) -> Connector:
        st = spec["settings"]
        return EmbeddedConnector(
            worker.scheduler,
            endpoint_for(worker),
            spec["inbox"],
            spec["name"],
            partition,
            epoch,
            max_queued_messages=st["direct_max_messages"],
            max_queued_bytes=st["direct_max_bytes"],
            read_bytes=st["read_bytes"],
        )

    async def prepare(self, client: Client, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The inbox topic with the pipeline's partitions (an empty one of another count is made
        again), and the outbox, dead-letter and record topics."""
        broker = BrokerRPC(client.scheduler)
        st = spec["settings"]
        inbox = TopicSettings(**st["inbox_topic"])
        have = await broker.create_topic(spec["inbox"], inbox)
        if have.partitions != spec["partitions"]:
            info = await broker.info(spec["inbox"])
            waiting = sum(e - s for s, e in zip(info["start"], info["end"]))
            if waiting:
                raise ConfigError(
                    f"pipeline {spec['name']!r}: inbox topic {spec['inbox']!r} exists with {have.partitions} "
                    f"partitions, not {spec['partitions']}, and holds {waiting} unprocessed requests; deploy with "
                    f"partitions={have.partitions}, or delete the topic "
                    f"(daskinfer.delete_topic(client, {spec['inbox']!r}))"
                )
            await broker.delete_topic(spec["inbox"])  # empty: made again with the pipeline's partitions
            await broker.create_topic(spec["inbox"], inbox)
        retained = TopicSettings(**st["retained_topic"])
        for t in (spec["outbox"], spec.get("dead_letter"), *(spec.get("record_topics") or ())):
            if t:
                await broker.create_topic(t, dataclasses.replace(retained, partitions=1))
        return dict(spec.get("connector_options") or {})

    def make_transport(self, client: Client, kind: str) -> ClientTransport:
        if kind == "direct":
            return DirectTransport(client)
        if kind == "topic":
            return EmbeddedTransport(client)
        return super().make_transport(client, kind)
