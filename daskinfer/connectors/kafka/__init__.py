"""Apache Kafka as inbox and outbox, with exactly-once results (needs ``confluent-kafka``:
``pip install daskinfer[kafka]``).

Layout, for a pipeline named ``name`` with inbox ``inbox`` and ``n`` partitions:

- the inbox is the topic ``inbox`` with ``n`` partitions; partition ``p`` is served by one
  partition runner, assigned by daskinfer's controller (the consumer reads it by manual
  assignment and commits offsets for the consumer group ``name``, so Kafka's tools show the
  group's lag);
- results go to the ``outbox`` topic, or to the reply topic that a request names (a client's
  own topic: Kafka's request-reply pattern), keyed by the request's key (partitioned like
  Java producers, murmur2), with the request id in the ``correlation_id`` header; failed
  requests' raw bytes go to the dead-letter topic.

**Exactly once** (``exactly_once``: ``"auto"`` by default, on where the brokers run
transactions).  Results and the inbox offset of the reads they answer are one Kafka
transaction (``send_offsets_to_transaction``; a read answered in several batches is one
transaction).  The runners of partition ``p`` share the transactional id
``daskinfer.{name}.{inbox}.{p}``: a new runner's ``init_transactions`` fences every older
one (it can commit nothing more, and its open transaction is aborted), so a consumer of the
outbox with ``isolation.level=read_committed`` sees each result exactly once, whatever
worker dies or broker restarts.  A failed transaction is aborted and made again until
``kafka.retry-timeout`` (see :mod:`~daskinfer.connectors.kafka.writers`).

Messages are at most ``kafka.max-message-bytes`` (the topics daskinfer creates allow that
size): a client's request frame over it is cut into frames that fit.

**At least once** (``exactly_once: false``): results are written (idempotent producer,
``acks=all``), then the offset is committed; after a failure, results may repeat and
:class:`~daskinfer.InferenceClient` drops the repeats by request id.

>>> pipe = Pipeline(model="mlp", inbox="requests", connector="kafka",
...                 connector_options={"bootstrap_servers": "127.0.0.1:9092"})
>>> handle = deploy_pipeline(client, pipe)                                    # doctest: +SKIP
>>> ic = InferenceClient(client, inbox="requests",
...                      transport=KafkaTransport("127.0.0.1:9092"))          # doctest: +SKIP
"""

from __future__ import annotations

from daskinfer.importing import lazy_exports

# imported on first use, so that the connector's plugin (.plugin) loads without confluent-kafka
_EXPORTS = {
    "prepare": "daskinfer.connectors.kafka.admin",
    "KafkaConnector": "daskinfer.connectors.kafka.consumer",
    "KafkaOptions": "daskinfer.connectors.kafka.link",
    "KafkaTransport": "daskinfer.connectors.kafka.transport",
    "CORRELATION_HEADER": "daskinfer.connectors.kafka.writers",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["CORRELATION_HEADER", "KafkaConnector", "KafkaOptions", "KafkaTransport", "prepare"]
