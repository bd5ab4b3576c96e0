"""Redis Streams as inbox and outbox (needs the ``redis`` package: ``pip install daskinfer[redis]``).

Layout, for a pipeline named ``name`` with inbox ``inbox`` and ``n`` partitions:

- inbox partition ``p`` is the stream ``f"{inbox}:{p}"``; clients pick ``p`` with
  :func:`~daskinfer.connectors.embedded.partition_for` (a key always maps to the same
  partition, so per-key order holds);
- ``f"{inbox}:meta"`` (a hash) records ``partitions`` and each pipeline's deployment
  ``generation:{name}``;
- every partition stream has one consumer group, ``name``; each partition runner is one
  consumer ``f"{name}-p{p}-e{epoch}-g{generation}"``, and ``f"{inbox}:{p}:fence:{name}"``
  holds the fencing token of the runner that owns the partition now;
- results go to the ``outbox`` stream or to a client's reply stream (``reply_to``), failed
  requests' raw bytes to the dead-letter stream; every entry has one field, ``d``: the
  encoded message.

Delivery is at least once.  A runner reads with ``XREADGROUP`` (so a read entry is pending
in the group until acknowledged), writes results, and only then ``XACK``\\s and ``XDEL``\\s
the entries (so the inbox holds only unprocessed entries and memory stays bounded).  A new
runner of a partition (a new epoch) takes over the pending entries of its predecessors
with ``XAUTOCLAIM`` and serves them first.  Reads and acknowledgements are Lua scripts that
check the fencing token first, so a superseded runner can neither take new entries nor
acknowledge: it gets :class:`~daskinfer.connectors.base.PartitionRevoked`.

Inbox streams are never trimmed: producers are pushed back instead (a send waits while a
partition holds ``redis.max-stream-length`` entries, then fails with
:class:`~daskinfer.exceptions.TopicFullError`).  Outbox and reply streams are capped with
an approximate ``MAXLEN`` (clients consume and delete their entries), and a result for a
reply stream that no longer exists (its client closed) is dropped.

A lost connection is retried with exponential backoff (``redis.reconnect-*``); after a
reconnect a runner re-reads its own pending entries, so nothing read is lost or skipped.
``rediss://`` URLs (TLS) and passwords (``redis://:secret@host:6379/0``) work as in
:meth:`redis.asyncio.Redis.from_url`.  Scripts touch keys of several partitions, so a
Redis Cluster is not supported; use a single server (or a primary with replicas).

>>> pipe = Pipeline(model="mlp", inbox="requests", connector="redis",
...                 connector_options={"url": "redis://127.0.0.1:6379/0"})
>>> handle = deploy_pipeline(client, pipe)                                    # doctest: +SKIP
>>> ic = InferenceClient(client, inbox="requests",
...                      transport=RedisTransport("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
"""

from __future__ import annotations

from daskinfer.importing import lazy_exports

# imported on first use, so that the connector's plugin (.plugin) loads without the redis package
_EXPORTS = {
    "RedisConnector": "daskinfer.connectors.redis.consumer",
    "prepare_streams": "daskinfer.connectors.redis.consumer",
    "RedisTransport": "daskinfer.connectors.redis.transport",
    "fence_key": "daskinfer.connectors.redis.scripts",
    "inbox_stream": "daskinfer.connectors.redis.scripts",
    "meta_key": "daskinfer.connectors.redis.scripts",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["RedisConnector", "RedisTransport", "fence_key", "inbox_stream", "meta_key", "prepare_streams"]
