"""Topics of a Kafka pipeline: create or check them at deploy time, and probe for transactions.

Needs ``confluent-kafka`` (``pip install daskinfer[kafka]``).  These calls block; the async
entry point :func:`prepare` runs them in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from daskinfer.connectors.kafka.link import KafkaOptions, kafka_error
from daskinfer.exceptions import BrokerError, ConfigError

logger = logging.getLogger(__name__)


def transactional_id(group: str, inbox: str, partition: int) -> str:
    """The transactional id of the runners of one inbox partition: a new runner fences the older ones."""
    return f"daskinfer.{group}.{inbox}.{partition}"


def topic_partitions(admin: AdminClient, topic: str, opts: KafkaOptions) -> int | None:
    """Partitions of ``topic``, None when it does not exist.

    Asks for the metadata of all topics: a request naming the topic could create it on a
    broker with ``auto.create.topics.enable``.
    """
    try:
        md = admin.list_topics(timeout=opts.operation_timeout)
    except KafkaException as e:
        raise BrokerError(
            f"kafka at {opts.bootstrap_servers}: cannot read topic metadata: {kafka_error(e) or e}"
        ) from e
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return None
    return len(t.partitions)


def ensure_topic(
    admin: AdminClient, topic: str, partitions: int, opts: KafkaOptions, config: dict[str, str] | None = None
) -> int:
    """Create ``topic`` unless it exists (``partitions`` -1: the broker's default); return its partitions."""
    have = topic_partitions(admin, topic, opts)
    if have is not None:
        return have
    new = NewTopic(
        topic,
        num_partitions=partitions,
        replication_factor=opts.replication_factor,
        config={**opts.topic_config(), **(config or {})},
    )
    try:
        admin.create_topics([new], operation_timeout=opts.operation_timeout)[topic].result(opts.operation_timeout)
    except KafkaException as e:
        err = kafka_error(e)
        if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise BrokerError(f"kafka at {opts.bootstrap_servers}: cannot create topic {topic!r}: {err or e}") from e
    deadline = time.monotonic() + opts.operation_timeout
    while True:  # wait until the metadata shows it (a producer's first write should find it)
        have = topic_partitions(admin, topic, opts)
        if have is not None:
            return have
        if time.monotonic() > deadline:
            raise BrokerError(
                f"kafka at {opts.bootstrap_servers}: topic {topic!r} was created but does not show "
                f"in the metadata after {opts.operation_timeout:g}s"
            )
        time.sleep(0.02)


def delete_topic(admin: AdminClient, topic: str, timeout: float) -> None:
    try:
        admin.delete_topics([topic], operation_timeout=timeout)[topic].result(timeout)
    except KafkaException as e:
        err = kafka_error(e)
        if err is None or err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise


def probe_transactions(opts: KafkaOptions, group: str) -> str | None:
    """Why the brokers cannot run transactions for this pipeline, or None when they can.

    A single broker with the default ``transaction.state.log.replication.factor`` of 3, a
    broker older than 0.11, or an ACL refusing the transactional id are the usual reasons.
    """
    producer = Producer(
        opts.producer_config(
            **{
                "transactional.id": f"daskinfer.{group}.probe",
                "transaction.timeout.ms": max(1000, int(opts.transaction_timeout * 1000)),
            }
        )
    )
    try:
        producer.init_transactions(opts.operation_timeout)
        return None
    except KafkaException as e:
        return str(kafka_error(e) or e)
    finally:
        producer.flush(0)


def _prepare(spec: dict[str, Any]) -> None:
    opts = KafkaOptions.resolve(spec.get("connector_options"))
    name, inbox, n = spec["name"], spec["inbox"], int(spec["partitions"])
    admin = AdminClient(opts.librdkafka())
    have = ensure_topic(admin, inbox, n, opts)
    if have != n:
        raise ConfigError(
            f"pipeline {name!r}: kafka topic {inbox!r} exists with {have} partitions, not {n}; "
            f"deploy with partitions={have} or use another inbox"
        )
    for topic in (spec["outbox"], spec["dead_letter"], *(spec.get("record_topics") or ())):
        if topic:
            ensure_topic(admin, topic, opts.outbox_partitions, opts)
    exactly_once = opts.exactly_once
    if exactly_once is not False:
        problem = probe_transactions(opts, name)
        if problem is None:
            exactly_once = True
        elif exactly_once is True:
            raise ConfigError(
                f"pipeline {name!r}: exactly_once is set but kafka at {opts.bootstrap_servers} cannot "
                f"run transactions: {problem}. Set exactly_once to false (at-least-once) or fix the "
                f"brokers (transaction.state.log.replication.factor <= number of brokers)"
            )
        else:
            logger.warning(
                "pipeline %r: kafka at %s cannot run transactions (%s); delivering at least once",
                name,
                opts.bootstrap_servers,
                problem,
            )
            exactly_once = False
    spec["connector_options"] = dataclasses.replace(opts, exactly_once=exactly_once).to_options()


async def prepare(spec: dict[str, Any]) -> None:
    """Create (or check) a pipeline's topics and settle its delivery mode, before its runners start.

    The inbox gets ``spec["partitions"]`` partitions (an existing inbox must have as many);
    the outbox, dead-letter and record topics are created with ``outbox_partitions``.  With
    ``exactly_once`` ``"auto"`` (the default) the brokers are probed for transactions and the
    pipeline runs exactly once where they work, at least once where they do not.  The
    settings, resolved here from options and config, are written back into
    ``spec["connector_options"]`` so that every worker uses them.

    Parameters
    ----------
    spec : dict
        The pipeline spec in plain form (``PipelineSpec.to_plain()``); its
        ``connector_options`` are replaced by the settled ones.

    Raises
    ------
    ConfigError
        The inbox exists with another number of partitions; ``exactly_once`` is true and the
        brokers cannot run transactions; an unknown option.
    BrokerError
        The brokers cannot be reached or refuse to create a topic.
    """
    await asyncio.to_thread(_prepare, spec)
