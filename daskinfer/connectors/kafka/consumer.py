"""A partition runner's access to Kafka (see :mod:`daskinfer.connectors.kafka`).

Needs ``confluent-kafka`` (``pip install daskinfer[kafka]``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from daskinfer.connectors.base import Connector, Envelope, PartitionRevoked
from daskinfer.connectors.kafka.admin import transactional_id
from daskinfer.connectors.kafka.link import (
    FENCED_CODES,
    GONE_CODES,
    KafkaOptions,
    Lane,
    kafka_error,
    poll_messages,
    retry,
)
from daskinfer.connectors.kafka.messages import Messages, OutMessage
from daskinfer.exceptions import BrokerError

logger = logging.getLogger(__name__)

CORRELATION_HEADER = "correlation_id"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class KafkaConnector(Connector):
    """A partition runner's access to Kafka: one inbox partition, assigned by the controller.

    Exactly once (``exactly_once`` resolved true by :func:`~daskinfer.connectors.kafka.prepare`):
    each batch's results and its input offset go in one Kafka transaction, with the
    transactional id of the partition, so a newer runner of the partition fences this one.
    At least once: results are written and acknowledged by the brokers, then the offset is
    committed.

    Parameters
    ----------
    spec : dict
        The pipeline spec: ``name`` (the consumer group), ``inbox``, ``outbox``, ``dead_letter``
        and ``connector_options`` (as settled by :func:`~daskinfer.connectors.kafka.prepare`).
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
        self.outbox: str = spec["outbox"]
        self.dead_letter: str | None = spec["dead_letter"]
        self.partition = partition
        self.epoch = epoch
        self.owner = consumer
        self.exactly_once = self.opts.exactly_once is not False
        self.transactional_id = transactional_id(self.group, self.inbox, partition)
        self.name = f"partition {partition} of kafka topic {self.inbox!r} (group {self.group!r}, epoch {epoch})"
        self.reader = Lane(f"kafka-read-{self.inbox}-{partition}")
        self.writer = Lane(f"kafka-write-{self.inbox}-{partition}")
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._group_metadata: Any = None
        self._tp = TopicPartition(self.inbox, partition)
        self._own_topics = {self.outbox, self.dead_letter} - {None}
        self._reply_topics: dict[str, tuple[bool, float]] = {}  # topic -> (exists, checked at)
        self._undelivered: list[tuple[KafkaError, str]] = []
        self._closed = False
        self.position = 0  # next offset to read
        self.committed = 0  # next offset to commit (all before it are answered)
        self.read_count = 0
        self.dropped = 0
        self.aborted = 0

    # -- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the partition: fence its older runners (exactly once), resume at the committed offset."""
        await self.writer.run(self._start)

    def _start(self) -> None:
        opts = self.opts
        deadline = time.monotonic() + opts.retry_timeout
        self.consumer = Consumer(opts.librdkafka(**{
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",  # skip requests of aborted producer transactions
            "auto.offset.reset": "earliest",
        }))
        if self.exactly_once:
            self.producer = Producer(opts.producer_config(**{
                "transactional.id": self.transactional_id,
                "transaction.timeout.ms": _ms(opts.transaction_timeout),
            }))
            try:
                # fences the runners before this one and aborts their open transaction
                retry(self.producer.init_transactions, deadline, opts)
            except KafkaException as e:
                raise self._failure("taking the transactional id", e) from e
            self._group_metadata = self.consumer.consumer_group_metadata()
        else:
            self.producer = Producer(opts.producer_config(**{
                "message.timeout.ms": _ms(opts.retry_timeout),
                "on_delivery": self._on_delivery,
            }))
        try:
            # read_committed: waits for offsets of a transaction still open (require_stable)
            consumer = self.consumer
            committed = retry(lambda timeout: consumer.committed([self._tp], timeout), deadline, opts)[0].offset
            if committed < 0:  # nothing committed yet: from the oldest message kept
                committed = retry(lambda timeout: consumer.get_watermark_offsets(self._tp, timeout, False),
                                  deadline, opts)[0]
        except KafkaException as e:
            raise self._failure("reading the committed offset", e) from e
        self.consumer.assign([TopicPartition(self.inbox, self.partition, committed if committed >= 0 else OFFSET_BEGINNING)])
        self.position = self.committed = max(committed, 0)
        logger.info("%s starts at offset %d (%s)", self.name, self.committed,
                    "exactly once" if self.exactly_once else "at least once")

    def _failure(self, what: str, exc: BaseException) -> Exception:
        err = kafka_error(exc)
        if err is not None and err.code() in FENCED_CODES:
            return PartitionRevoked(f"{self.name}: fenced by a newer runner of the partition while {what} ({err.str()})")
        return BrokerError(f"{self.name}: kafka at {self.opts.bootstrap_servers} failed while {what}: {err or exc}")

    # -- read ----------------------------------------------------------------------------------
    async def read_messages(self, max_messages: int, timeout: float) -> Messages:
        """Up to ``max_messages`` messages, waiting up to ``timeout`` s for the first."""
        msgs = await self._read(max_messages, timeout)
        if not msgs:
            return Messages([])
        return Messages([m.value() for m in msgs], (msgs[0].offset(), msgs[-1].offset()))

    async def read(self, max_messages: int, timeout: float) -> list[Envelope]:
        """Today's interface of :class:`~daskinfer.connectors.base.Connector`: one envelope a message."""
        p = self.partition
        return [Envelope(p, m.offset(), m.value()) for m in await self._read(max_messages, timeout)]

    async def _read(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            raise PartitionRevoked(f"{self.name}: connector closed")
        msgs = await self.reader.run(self._poll, max_messages, timeout)
        if msgs:
            self.position = msgs[-1].offset() + 1
            self.read_count += len(msgs)
        return msgs

    def _poll(self, max_messages: int, timeout: float) -> list[Message]:
        assert self.consumer is not None, "KafkaConnector.start was not called"
        return poll_messages(self.consumer, max_messages, timeout, lambda: self._closed, self.name)

    async def backlog(self) -> int:
        """Messages of this partition not yet committed (consumer lag), from the last fetch's high watermark."""
        assert self.consumer is not None, "KafkaConnector.start was not called"
        _, high = self.consumer.get_watermark_offsets(self._tp, cached=True)
        if high < 0:  # nothing fetched yet: ask the broker
            _, high = await asyncio.to_thread(self.consumer.get_watermark_offsets, self._tp,
                                              self.opts.operation_timeout, False)
        return max(0, high - self.committed)

    # -- write ---------------------------------------------------------------------------------
    async def write_and_commit(self, writes: Sequence[OutMessage | tuple], done: Messages | list[Envelope]) -> None:
        """Write results and dead letters, then commit the inbox up to the end of ``done``.

        Exactly once: one transaction (a failed one is aborted and tried again until
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
        upto = self._end_of(done)
        if upto is not None and upto <= self.committed:
            upto = None
        if not writes and upto is None:
            return
        if self.exactly_once:
            await self.writer.run(self._transact, writes, upto)
        else:
            await self.writer.run(self._write_then_commit, writes, upto)
        if upto is not None:
            self.committed = upto

    @staticmethod
    def _end_of(done: Messages | list[Envelope]) -> int | None:
        """The offset after the last message of ``done`` (batches are written and committed in order)."""
        if isinstance(done, Messages):
            return None if done.positions is None else done.positions[1] + 1
        return max(e.offset for e in done) + 1 if done else None

    async def write(self, items: Sequence[OutMessage | tuple]) -> None:
        await self.write_and_commit(items, [])

    async def commit(self, envelopes: list[Envelope]) -> None:
        await self.write_and_commit([], envelopes)

    def _live(self, writes: Sequence[OutMessage | tuple], recheck: bool = False) -> Sequence[OutMessage | tuple]:
        """``writes`` without those for reply topics that do not exist (clients that left)."""
        own = self._own_topics
        targets = {w[0] for w in writes} - own
        if not targets:
            return writes
        now = time.monotonic()
        gone = set()
        for t in targets:
            known = self._reply_topics.get(t)
            if recheck or known is None or now - known[1] > self.opts.reply_check_interval:
                known = (self._topic_exists(t), now)
                self._reply_topics[t] = known
            if not known[0]:
                gone.add(t)
        if not gone:
            return writes
        live = [w for w in writes if w[0] not in gone]
        self.dropped += len(writes) - len(live)
        logger.warning("%s: %d results for reply topics %s dropped: the topics are gone (clients that left)",
                       self.name, len(writes) - len(live), sorted(gone))
        return live

    def _topic_exists(self, topic: str) -> bool:
        assert self.producer is not None
        try:
            # through the producer (allow.auto.create.topics off): on the consumer's connection
            # the request would wait behind a fetch that the broker holds for new messages
            md = self.producer.list_topics(topic, timeout=self.opts.operation_timeout)
        except KafkaException as e:
            raise self._failure(f"looking up reply topic {topic!r}", e) from e
        t = md.topics.get(topic)
        return t is not None and t.error is None

    def _produce(self, writes: Sequence[OutMessage | tuple]) -> None:
        producer = self.producer
        assert producer is not None
        produce = producer.produce
        for w in writes:
            cid = w[3] if len(w) > 3 else None
            headers = [(CORRELATION_HEADER, cid)] if cid else None
            while True:
                try:
                    produce(w[0], w[2], w[1], headers=headers)
                    break
                except BufferError:  # librdkafka's queue is full: let it send
                    producer.poll(0.01)

    def _transact(self, writes: Sequence[OutMessage | tuple], upto: int | None) -> None:
        producer = self.producer
        assert producer is not None
        deadline = time.monotonic() + self.opts.retry_timeout
        recheck = False
        while True:
            live = self._live(writes, recheck)
            try:
                producer.begin_transaction()
                self._produce(live)
                if upto is not None:
                    producer.send_offsets_to_transaction([TopicPartition(self.inbox, self.partition, upto)],
                                                         self._group_metadata, self.opts.operation_timeout)
                retry(producer.commit_transaction, deadline, self.opts)
                return
            except KafkaException as e:
                self._abort(deadline)
                err = kafka_error(e)
                if err is None or err.code() in FENCED_CODES or err.fatal() or self._closed or time.monotonic() > deadline:
                    raise self._failure("writing a transaction of results", e) from e
                logger.warning("%s: transaction failed, aborted, trying again: %s", self.name, err.str())
                self.aborted += 1
                recheck = True  # a reply topic may have gone meanwhile
            except BaseException:
                self._abort(deadline)
                raise

    def _abort(self, deadline: float) -> None:
        """Abort the open transaction, if any (best effort: a fenced producer has none to abort)."""
        try:
            retry(self.producer.abort_transaction, max(deadline, time.monotonic() + self.opts.operation_timeout), self.opts)
        except KafkaException as e:
            err = kafka_error(e)
            if err is not None and err.code() not in FENCED_CODES and err.code() != KafkaError._STATE:
                logger.warning("%s: aborting the transaction failed: %s", self.name, err.str())

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._undelivered.append((err, msg.topic()))

    def _write_then_commit(self, writes: Sequence[OutMessage | tuple], upto: int | None) -> None:
        producer, consumer = self.producer, self.consumer
        assert producer is not None and consumer is not None
        deadline = time.monotonic() + self.opts.retry_timeout
        self._undelivered.clear()
        self._produce(self._live(writes))
        left = producer.flush(self.opts.retry_timeout)
        if left:
            raise BrokerError(f"{self.name}: {left} results not delivered to kafka at {self.opts.bootstrap_servers} "
                              f"within {self.opts.retry_timeout:g}s (retry_timeout); the offset stays uncommitted")
        gone = {t for e, t in self._undelivered if e.code() in GONE_CODES and t not in self._own_topics}
        failed = [(e, t) for e, t in self._undelivered if t not in gone]
        if gone:  # a reply topic deleted after the check: its results are dropped
            self.dropped += len(self._undelivered) - len(failed)
            self._reply_topics.update(dict.fromkeys(gone, (False, time.monotonic())))
        if failed:
            raise BrokerError(f"{self.name}: {len(failed)} results not delivered, e.g. to {failed[0][1]!r}: "
                              f"{failed[0][0].str()}; the offset stays uncommitted")
        if upto is not None:
            offsets = [TopicPartition(self.inbox, self.partition, upto)]
            try:
                retry(lambda timeout: consumer.commit(offsets=offsets, asynchronous=False), deadline, self.opts)
            except KafkaException as e:
                raise self._failure("committing the offset", e) from e

    # -- the rest ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop reading, let a write in progress end, close the clients (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.reader.run(lambda: None)  # after any poll in progress: none meets a closed consumer
            await self.writer.run(self._close_clients)
        finally:
            self.reader.shutdown()
            self.writer.shutdown()

    def _close_clients(self) -> None:
        try:
            if self.producer is not None:
                self.producer.flush(min(1.0, self.opts.operation_timeout))
        except KafkaException as e:  # a fenced producer fails every call: nothing of it is left to send
            logger.debug("%s: %s", self.name, e)
        finally:
            if self.consumer is not None:
                self.consumer.close()

    def describe(self) -> dict[str, Any]:
        backlog = None
        if self.consumer is not None and not self._closed:
            high = self.consumer.get_watermark_offsets(self._tp, cached=True)[1]
            backlog = max(0, high - self.committed) if high >= 0 else None
        return {
            "topic": self.inbox,
            "owner": self.owner,
            "exactly_once": self.exactly_once,
            "transactional_id": self.transactional_id if self.exactly_once else None,
            "position": self.position,
            "committed": self.committed,
            "backlog": backlog,
            "dropped": self.dropped,
            "aborted": self.aborted,
        }
