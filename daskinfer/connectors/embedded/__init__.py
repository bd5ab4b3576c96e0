"""The embedded connector: needs nothing but the Dask cluster.

- :mod:`.log`: the pure partition log (offsets, commits, bounds in messages and bytes, retention).
- :mod:`.topics`: the store: a topic's settings, its partitions' logs and who waits on them.
- :mod:`.broker`: the broker extension on the scheduler (its RPC handlers) and its install.
- :mod:`.sweeper`: expires retained messages and deletes the reply topics of clients that left.
- :mod:`.rpc`: the RPC client of the broker (clients, workers).
- :mod:`.connector`: a partition's reads (direct sends and the inbox topic) and writes.
- :mod:`.transport`: the client side of the topics (``InferenceClient(transport="topic")``).
"""

from daskinfer.connectors.embedded.broker import BrokerPlugin, ensure_broker, ensure_broker_async
from daskinfer.connectors.embedded.connector import EmbeddedConnector
from daskinfer.connectors.embedded.log import PartitionLog
from daskinfer.connectors.embedded.rpc import BrokerRPC
from daskinfer.connectors.embedded.topics import TopicSettings
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
