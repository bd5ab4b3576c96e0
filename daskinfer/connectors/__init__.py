"""Inbox/outbox connectors: one module or subpackage per broker, each knowing nothing of the controller.

- :mod:`daskinfer.connectors.base`: what a partition and a client need from a broker.
- :mod:`daskinfer.connectors.direct`: client -> worker -> client over Dask's comms (the default path).
- :mod:`daskinfer.connectors.embedded`: topics hosted by the Dask scheduler.
- :mod:`daskinfer.connectors.redis`: Redis Streams (extra ``[redis]``).
"""

from daskinfer.connectors.base import ClientTransport, Connector, Messages, OutMessage, PartitionRevoked

__all__ = ["ClientTransport", "Connector", "Messages", "OutMessage", "PartitionRevoked"]
