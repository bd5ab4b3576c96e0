"""The embedded connector: needs nothing but the Dask cluster.

- :mod:`.log`: the pure partition log (offsets, commits, bounds in messages and bytes, retention).
- :mod:`.broker`: scheduler-hosted topics (the broker extension and its RPC client).
- :mod:`.connector`: a partition's reads (direct sends and the inbox topic) and writes.
- :mod:`.transport`: the client side of the topics (``InferenceClient(transport="topic")``).
"""

from daskinfer.connectors.embedded.broker import (
    BrokerPlugin,
    BrokerRPC,
    TopicSettings,
    ensure_broker,
    ensure_broker_async,
)
from daskinfer.connectors.embedded.connector import EmbeddedConnector
from daskinfer.connectors.embedded.log import PartitionLog
from daskinfer.connectors.embedded.transport import EmbeddedTransport

__all__ = [
    "BrokerPlugin",
    "BrokerRPC",
    "EmbeddedConnector",
    "EmbeddedTransport",
    "PartitionLog",
    "TopicSettings",
    "ensure_broker",
    "ensure_broker_async",
]
