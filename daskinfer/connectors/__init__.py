"""Inbox/outbox connectors: one module per broker.

- :mod:`daskinfer.connectors.log`: the pure partition log (offsets, commits, bounds).
- :mod:`daskinfer.connectors.embedded`: the embedded broker hosted by the Dask scheduler.

A connector gives the partition runners three things (see :class:`Connector`):
``read`` a block of messages of one inbox partition, ``write`` encoded results to
topics, and ``commit`` a partition's position once its results are written.
"""

from daskinfer.connectors.base import Connector, Envelope

__all__ = ["Connector", "Envelope"]
