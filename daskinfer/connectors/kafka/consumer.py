"""A partition runner's access to Kafka (see :mod:`daskinfer.connectors.kafka`).

Needs ``confluent-kafka`` (``pip install daskinfer[kafka]``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from daskinfer.connectors.base import Connector, Messages, OutMessage, PartitionRevoked
from daskinfer.connectors.kafka.admin import transactional_id
from daskinfer.connectors.kafka.link import KafkaOptions, Lane, poll_messages, retry
from daskinfer.connectors.kafka.writers import AckedWriter, ResultWriter, TransactionalWriter
from daskinfer.exceptions import BrokerError

logger = logging.getLogger(__name__)


class KafkaConnector(Connector):
    """A partition runner's access to Kafka: one inbox partition, assigned by the controller.

    Exactly once (``exactly_once`` settled true by :func:`~daskinfer.connectors.kafka.prepare`):
    each batch's results and its inbox offset go in one Kafka transaction, with the
    transactional id of the partition, so a newer runner of the partition fences this one
    (:class:`~daskinfer.connectors.kafka.writers.TransactionalWriter`).  At least once: results
    are written and acknowledged by the brokers, then the offset is committed
    (:class:`~daskinfer.connectors.kafka.writers.AckedWriter`).

    Parameters
    ----------
    spec : dict
        The pipeline spec in plain form: ``name`` (the consumer group), ``inbox``, ``outbox``,
        ``dead_letter``, ``record_topics`` and ``connector_options`` (as settled by
        :func:`~daskinfer.connectors.kafka.prepare`).
    partition : int
        The inbox partition this runner serves.
    epoch : int
        The controller's epoch of this assignment (for logs: Kafka's producer epochs fence).
    consumer : str, optional
        Where the runner lives (for logs and :meth:`describe`).
    """

    def __init__(self, spec: dict[str, Any], partition: int, epoch: int, consumer: str | None = None):
        self.opts = KafkaOptions.resolve(spec.get("connector_options"))
        self.group: str = spec["name"]
        self.inbox: str = spec["inbox"]
        self.own_topics = {t for t in (spec["outbox"], spec["dead_letter"], *(spec.get("record_topics") or ())) if t}
        self.partition = partition
        self.epoch = epoch
        self.owner = consumer
        self.exactly_once = self.opts.exactly_once is not False
        self.transactional_id = transactional_id(self.group, self.inbox, partition)
        self.name = f"partition {partition} of kafka topic {self.inbox!r} (group {self.group!r}, epoch {epoch})"
        self.reader = Lane(f"kafka-read-{self.inbox}-{partition}")
        self.consumer: Consumer | None = None
        self.writer: ResultWriter | None = None
        self._tp = TopicPartition(self.inbox, partition)
        self._closed = False
        self.position = 0  # next offset to read
        self.committed = 0  # next offset to commit (all before it are answered)
        self.read_count = 0

    # -- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the partition: fence its older runners (exactly once), resume at the committed offset."""
        self.consumer = await self.reader.run(self._open_consumer)
        args = (self.opts, self.name, self.inbox, self.partition, self.own_topics, self.consumer)
        if self.exactly_once:
            self.writer = TransactionalWriter(*args, transactional_id=self.transactional_id)
        else:
            self.writer = AckedWriter(*args)
        await self.writer.start()  # exactly once: fences the older runners, aborts their open transaction
        await self.reader.run(self._resume)

    def _open_consumer(self) -> Consumer:
        return Consumer(
            self.opts.librdkafka(
                **{
                    "group.id": self.group,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "isolation.level": "read_committed",  # skip requests of aborted producer transactions
                    "auto.offset.reset": "earliest",
                }
            )
        )

    def _resume(self) -> None:
        consumer, opts = self.consumer, self.opts
        assert consumer is not None
        deadline = time.monotonic() + opts.retry_timeout
        try:
            # read_committed: waits for the offset of a transaction still open (require_stable)
            committed = retry(
                lambda timeout: consumer.committed([self._tp], timeout),
                deadline,
                opts,
                f"{self.name}: reading the committed offset",
            )[0].offset
            if committed < 0:  # nothing committed yet: from the oldest message kept
                committed = retry(
                    lambda timeout: consumer.get_watermark_offsets(self._tp, timeout, False),
                    deadline,
                    opts,
                    f"{self.name}: reading the first offset",
                )[0]
        except KafkaException as e:
            raise BrokerError(
                f"{self.name}: kafka at {opts.bootstrap_servers} failed while reading the committed offset: {e}"
            ) from e
        consumer.assign([TopicPartition(self.inbox, self.partition, committed if committed >= 0 else OFFSET_BEGINNING)])
        self.position = self.committed = max(committed, 0)
        logger.info(
            "%s starts at offset %d (%s)",
            self.name,
            self.committed,
            "exactly once" if self.exactly_once else "at least once",
        )

    # -- read ----------------------------------------------------------------------------------
    async def read(self, max_messages: int, timeout: float) -> Messages:
        """Up to ``max_messages`` messages, waiting up to ``timeout`` s for the first; their
        positions are the offsets ``(first, last)`` (offsets between may be transaction markers);
        the headers of those that have some, with the message key, are their ``meta``."""
        msgs = await self._read(max_messages, timeout)
        if not msgs:
            return Messages([])
        meta: list[dict[str, Any] | None] | None = None
        for i, m in enumerate(msgs):
            headers = m.headers()
            if headers:
                if meta is None:
                    meta = [None] * len(msgs)
                meta[i] = {**dict(headers), "key": m.key()}
        return Messages([m.value() or b"" for m in msgs], (msgs[0].offset(), msgs[-1].offset()), meta)

    async def _read(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            raise PartitionRevoked(f"{self.name}: connector closed")
        consumer = self.consumer
        assert consumer is not None, "KafkaConnector.start was not called"
        msgs = await self.reader.run(self._commit_and_poll, consumer, max_messages, timeout)
        if msgs:
            self.position = (msgs[-1].offset() or 0) + 1
            self.read_count += len(msgs)
        return msgs

    def _commit_and_poll(self, consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
        """On the reader's thread: poll, committing what was written meanwhile (at least once)."""
        commit = self.writer.commit_pending if isinstance(self.writer, AckedWriter) else None
        return poll_messages(consumer, max_messages, timeout, lambda: self._closed, self.name, commit)

    async def backlog(self) -> int:
        """Messages of this partition not yet committed (consumer lag), from the last fetch's high watermark."""
        assert self.consumer is not None, "KafkaConnector.start was not called"
        _, high = self.consumer.get_watermark_offsets(self._tp, cached=True)
        if high < 0:  # nothing fetched yet: ask the broker
            _, high = await asyncio.to_thread(
                self.consumer.get_watermark_offsets, self._tp, self.opts.operation_timeout, False
            )
        return max(0, high - self.committed)

    # -- write ---------------------------------------------------------------------------------
    async def write_and_commit(self, writes: Sequence[OutMessage], done: Sequence[Messages]) -> None:
        """Write results and dead letters, then commit the inbox up to the end of the reads ``done``.

        Exactly once: one transaction (a failed one is aborted and made again until
        ``retry_timeout``).  Results for a client's reply topic that is gone are dropped.

        Raises
        ------
        PartitionRevoked
            A newer runner of the partition fenced this one (nothing of this call is visible).
        BrokerError
            The brokers failed for longer than ``retry_timeout`` (nothing was committed).
        """
        if self._closed:
            raise PartitionRevoked(f"{self.name}: connector closed")
        assert self.writer is not None, "KafkaConnector.start was not called"
        # reads are written and committed in order: the last one's end is the new position
        upto = max((m.positions[1] + 1 for m in done if m.positions is not None), default=None)
        if upto is not None and upto <= self.committed:
            upto = None
        if not writes and upto is None:
            return
        await self.writer.write(writes, upto)
        if upto is not None:
            self.committed = upto

    # -- the rest ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop reading, let a write in progress end, close the clients (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.writer is not None:
                await self.writer.close()
            await self.reader.run(self._close_consumer)  # after any poll in progress
        finally:
            self.reader.shutdown()

    def _close_consumer(self) -> None:
        if isinstance(self.writer, AckedWriter):
            try:
                self.writer.commit_pending()
            except Exception as e:  # the next runner answers those requests again
                logger.info("%s: last commit failed: %s", self.name, e)
        if self.consumer is not None:
            self.consumer.close()

    def describe(self) -> dict[str, Any]:
        writer = self.writer
        return {
            "topic": self.inbox,
            "owner": self.owner,
            "exactly_once": self.exactly_once,
            "transactional_id": self.transactional_id if self.exactly_once else None,
            "position": self.position,
            "committed": self.committed,
            "dropped": writer.dropped if writer else 0,
            "aborted": writer.aborted if writer else 0,
            "producers_replaced": writer.replaced if writer else 0,
        }
