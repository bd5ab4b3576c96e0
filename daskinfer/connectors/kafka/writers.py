"""How a partition runner writes results and commits its inbox offset: in one transaction, or at least once.

Needs ``confluent-kafka`` (``pip install daskinfer[kafka]``).  Each writer owns a producer and a
:class:`~daskinfer.connectors.kafka.link.Lane` (the thread its blocking calls run on).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from daskinfer.connectors.base import OutMessage, PartitionRevoked
from daskinfer.connectors.kafka.link import FENCED_CODES, GONE_CODES, KafkaOptions, Lane, kafka_error, millis, retry
from daskinfer.exceptions import BrokerError
from daskinfer.wire.codec import as_bytes

logger = logging.getLogger(__name__)

CORRELATION_HEADER = "correlation_id"
HANG_GRACE = 5.0  # s past a call's own timeout after which a transactional call counts as hung
WATCH_INTERVAL = 0.5  # s between two looks at a write in progress

Writes = Sequence[OutMessage]


class ResultWriter:
    """Writes results and dead letters of one inbox partition, then commits its offset.

    Parameters
    ----------
    opts : KafkaOptions
        Settled settings.
    name : str
        The partition, for messages.
    inbox, partition :
        What the offsets are of.
    own_topics : set of str
        The outbox, dead-letter and record topics (any other target is a client's reply topic,
        which may be gone).
    consumer : confluent_kafka.Consumer
        The runner's consumer (its group commits the offsets).
    """

    def __init__(
        self, opts: KafkaOptions, name: str, inbox: str, partition: int, own_topics: set[str], consumer: Consumer
    ):
        self.opts = opts
        self.name = name
        self.inbox = inbox
        self.partition = partition
        self.own_topics = own_topics
        self.consumer = consumer
        self.lane = Lane(f"kafka-write-{inbox}-{partition}")
        self.producer: Producer | None = None
        self.closed = False
        self.dropped = 0
        self.aborted = 0
        self.replaced = 0  # producers left behind hung (exactly once)
        self._reply_topics: dict[str, tuple[bool, float]] = {}  # topic -> (exists, checked at)

    async def start(self) -> None:
        """Open the producer (exactly once: take the transactional id, fencing older runners)."""
        await self.lane.run(self._open)

    def _open(self) -> None:
        raise NotImplementedError

    async def write(self, writes: Writes, upto: int | None) -> None:
        """Write ``writes``, then commit the inbox up to offset ``upto`` (None: no commit)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Let a write in progress end, send what is queued, release the producer."""
        self.closed = True
        try:  # bounded: a hung call on the lane must not hold the runner's stop
            await asyncio.wait_for(self.lane.run(self._flush), self.opts.operation_timeout + HANG_GRACE)
        except asyncio.TimeoutError:
            logger.warning("%s: the producer did not close in time; left behind", self.name)
        finally:
            self.lane.shutdown()

    def _flush(self) -> None:
        try:
            if self.producer is not None:
                self.producer.flush(min(1.0, self.opts.operation_timeout))
        except KafkaException as e:  # a fenced producer fails every call: nothing of it is left to send
            logger.debug("%s: %s", self.name, e)

    def failure(self, what: str, exc: BaseException) -> Exception:
        """The exception to raise for a Kafka error: fenced -> PartitionRevoked, else BrokerError."""
        err = kafka_error(exc)
        if err is not None and err.code() in FENCED_CODES:
            return PartitionRevoked(
                f"{self.name}: fenced by a newer runner of the partition while {what} ({err.str()})"
            )
        return BrokerError(f"{self.name}: kafka at {self.opts.bootstrap_servers} failed while {what}: {err or exc}")

    # -- helpers run on the lane -----------------------------------------------------------
    def live(self, producer: Producer, writes: Writes, recheck: bool = False) -> Writes:
        """``writes`` without those for reply topics that do not exist (clients that left)."""
        targets = {w.target for w in writes} - self.own_topics
        if not targets:
            return writes
        now = time.monotonic()
        gone = set()
        for t in targets:
            known = self._reply_topics.get(t)
            if recheck or known is None or now - known[1] > self.opts.reply_check_interval:
                known = (self._topic_exists(producer, t), now)
                self._reply_topics[t] = known
            if not known[0]:
                gone.add(t)
        if not gone:
            return writes
        return self.drop(writes, gone)

    def drop(self, writes: Writes, gone: set[str]) -> Writes:
        live = [w for w in writes if w.target not in gone]
        self.dropped += len(writes) - len(live)
        self._reply_topics.update(dict.fromkeys(gone, (False, time.monotonic())))
        logger.warning(
            "%s: %d results for reply topics %s dropped: the topics are gone (clients that left)",
            self.name,
            len(writes) - len(live),
            sorted(gone),
        )
        return live

    def _topic_exists(self, producer: Producer, topic: str) -> bool:
        try:
            # through the producer (allow.auto.create.topics off): on the consumer's connection
            # the request would wait behind a fetch that the broker holds for new messages
            md = producer.list_topics(topic, timeout=self.opts.operation_timeout)
        except KafkaException as e:
            raise self.failure(f"looking up reply topic {topic!r}", e) from e
        t = md.topics.get(topic)
        return t is not None and t.error is None

    @staticmethod
    def produce(producer: Producer, writes: Writes, on_delivery: Callable[..., None] | None = None) -> None:
        """Produce ``writes`` (the request id in the correlation header), waiting only while
        librdkafka's queue is full; ``on_delivery(err, msg)`` for each, if given."""
        produce = producer.produce
        for target, key, data, cid, more in writes:
            headers: list[tuple[str, str | bytes | None]] | None = (
                [(CORRELATION_HEADER, cid), *more] if cid else list(more)
            ) or None
            while True:
                try:
                    produce(target, as_bytes(data), key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:  # librdkafka's queue is full: let it send
                    producer.poll(0.01)


class TransactionalWriter(ResultWriter):
    """Exactly once: results and the inbox offset of the reads they answer in one Kafka transaction.

    A transaction stays open across writes without an offset (the pieces of a read larger
    than a batch) and commits with the write that carries the read's offset, so no result is
    visible before the offset that marks its request answered.  The producer's transactional
    id is the partition's: opening it fences every older runner of the partition and aborts
    its open transaction.  A failed transaction is aborted and made again, with every write
    since the last commit, until ``retry_timeout``.  A transactional call that hangs past its
    timeout (librdkafka issues #5456 and #5511: ``send_offsets_to_transaction`` can wait
    forever after a broker restart) is left behind: a new producer with the same id fences the
    hung one, and the transaction is made again with the new one.
    """

    def __init__(self, *args: Any, transactional_id: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.transactional_id = transactional_id
        self.group_metadata: Any = None
        self._pending: list[OutMessage] = []  # written since the last commit (made again if it aborts)
        self._produced = 0  # how many of them the open transaction holds
        self._open_on: Producer | None = None  # the producer whose transaction is open
        self._hang_at: dict[int, float] = {}  # id(producer) -> when its call in progress counts as hung
        self._left_behind: list[tuple[Lane, Producer]] = []  # hung: never destroyed while a thread is inside

    def _open(self) -> None:
        opts = self.opts
        producer = Producer(
            opts.producer_config(
                **{
                    "transactional.id": self.transactional_id,
                    "transaction.timeout.ms": millis(opts.transaction_timeout),
                }
            )
        )
        try:
            retry(
                lambda timeout: self._guarded(producer, producer.init_transactions, timeout),
                time.monotonic() + opts.retry_timeout,
                opts,
                f"{self.name}: taking the transactional id",
            )
        except KafkaException as e:
            raise self.failure("taking the transactional id", e) from e
        self.group_metadata = self.consumer.consumer_group_metadata()
        self.producer = producer

    def _guarded(self, producer: Producer, call: Callable[..., Any], timeout: float, *args: Any) -> Any:
        """``call(*args, timeout)``, marked so that :meth:`write` sees it if it hangs."""
        key = id(producer)
        self._hang_at[key] = time.monotonic() + timeout + HANG_GRACE
        try:
            return call(*args, timeout)
        finally:
            self._hang_at.pop(key, None)

    def _hung(self) -> bool:
        at = self._hang_at.get(id(self.producer))
        return at is not None and time.monotonic() > at

    async def write(self, writes: Writes, upto: int | None) -> None:
        """Write into the open transaction; with ``upto``, add the offset and commit it."""
        self._pending += writes
        while True:
            producer = self.producer
            job = asyncio.ensure_future(self.lane.run(self._transact, producer, upto))
            while not job.done():
                await asyncio.wait({job}, timeout=WATCH_INTERVAL)
                if not job.done() and self._hung():
                    break
            if job.done():
                return job.result()
            job.add_done_callback(lambda f: f.cancelled() or f.exception())  # whatever it ends with, later
            logger.warning(
                "%s: a transactional call of librdkafka hangs past its timeout; fencing it with a new "
                "producer and making the transaction again",
                self.name,
            )
            self._left_behind.append((self.lane, producer))  # type: ignore[arg-type]
            self.lane = Lane(f"kafka-write-{self.inbox}-{self.partition}")
            self.replaced += 1
            await self.lane.run(self._open)
            # the hung call may have been a commit that reached the coordinator: fencing completes it
            # instead of aborting it.  Then the transaction is in, and making it again would show its
            # results twice: the group's committed offset says which it was.
            if upto is not None and await self.lane.run(self._committed_offset) >= upto:
                logger.warning("%s: the transaction of the hung call was committed; not making it again", self.name)
                self._open_on, self._pending, self._produced = None, [], 0
                return

    def _committed_offset(self) -> int:
        """The inbox offset committed for the group now (stable: no transaction of it is still open)."""
        opts = self.opts
        tp = TopicPartition(self.inbox, self.partition)
        try:
            got = retry(
                lambda timeout: self.consumer.committed([tp], timeout),
                time.monotonic() + opts.retry_timeout,
                opts,
                f"{self.name}: reading the committed offset",
            )
        except KafkaException as e:
            raise self.failure("reading the committed offset", e) from e
        return got[0].offset

    def _transact(self, producer: Producer, upto: int | None) -> None:
        opts = self.opts
        deadline = time.monotonic() + opts.retry_timeout
        offsets = None if upto is None else [TopicPartition(self.inbox, self.partition, upto)]
        recheck = False
        while True:
            try:
                if self._open_on is not producer:  # begin, with everything written since the last commit
                    self._pending = list(self.live(producer, self._pending, recheck))
                    self._produced = 0
                    producer.begin_transaction()
                    self._open_on = producer
                else:
                    self._pending[self._produced :] = self.live(producer, self._pending[self._produced :])
                self.produce(producer, self._pending[self._produced :])
                self._produced = len(self._pending)
                if offsets is None:
                    return  # stays open: it commits with the offset of the read these results answer
                # not called again after a failure (a second call after a timed-out
                # AddOffsetsToTxn has waited forever): the transaction is made again instead
                self._guarded(
                    producer, producer.send_offsets_to_transaction, opts.operation_timeout, offsets, self.group_metadata
                )
                # a commit that timed out is resumed by calling it again, as librdkafka asks
                retry(
                    lambda timeout: self._guarded(producer, producer.commit_transaction, timeout),
                    deadline,
                    opts,
                    f"{self.name}: committing the transaction",
                )
                self._open_on, self._pending, self._produced = None, [], 0
                return
            except KafkaException as e:
                err = kafka_error(e)
                if producer is not self.producer:  # left behind while hung: it must touch nothing
                    raise self.failure("writing a transaction of results", e) from e
                self._open_on = None
                if err is None or err.code() in FENCED_CODES or err.fatal():
                    raise self.failure("writing a transaction of results", e) from e
                if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:  # trying again cannot help
                    self._abort(producer, e)
                    raise self.failure(
                        f"writing a result over {opts.max_message_bytes} bytes (kafka.max-message-bytes)", e
                    ) from e
                self._abort(producer, e)
                if self.closed or time.monotonic() > deadline:
                    raise self.failure("writing a transaction of results", e) from e
                logger.warning("%s: transaction failed, aborted, making it again: %s", self.name, err.str())
                self.aborted += 1
                recheck = True  # a reply topic may have gone meanwhile
                time.sleep(opts.retry_backoff_max)
            except BaseException as e:  # not Kafka's doing (a value that is not bytes): nothing is committed
                if producer is self.producer:
                    self._open_on = None
                    self._abort(producer, e)
                raise

    def _abort(self, producer: Producer, cause: BaseException) -> None:
        """Abort the open transaction; a producer that cannot is done (the partition restarts with a new one)."""
        try:
            retry(
                lambda timeout: self._guarded(producer, producer.abort_transaction, timeout),
                time.monotonic() + self.opts.operation_timeout,
                self.opts,
                f"{self.name}: aborting the transaction",
            )
        except KafkaException as e:
            err = kafka_error(e)
            if err is not None and err.code() == KafkaError._STATE:  # no transaction was open
                return
            raise self.failure(f"aborting a transaction that failed ({cause})", e) from e

    def _flush(self) -> None:
        """Abort a transaction left open (its reads were not committed: the next runner redoes them)."""
        if self._open_on is not None and self._open_on is self.producer:
            self._open_on = None
            try:
                self._abort(self.producer, RuntimeError("closing"))
            except Exception as e:  # fenced or gone: nothing of it will be visible anyway
                logger.debug("%s: %s", self.name, e)
        super()._flush()


class _Write:
    """One write of an at-least-once writer: results not yet acknowledged, and the offset it commits."""

    __slots__ = ("left", "upto", "errors")

    def __init__(self, left: int, upto: int | None):
        self.left = left
        self.upto = upto
        self.errors: list[tuple[KafkaError, str]] = []


class AckedWriter(ResultWriter):
    """At least once: results are produced at once, without waiting for the previous write's
    acknowledgements; the inbox offset of a write is committed once its results and every earlier
    write's are acknowledged (in order), on the reader's thread (see :meth:`commit_pending`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._writes: deque[_Write] = deque()  # in write order, until acknowledged
        self._lock = threading.Lock()  # delivery reports run on whichever thread polls the producer
        self._failed: BrokerError | None = None
        self.to_commit: int | None = None  # acknowledged and not yet committed

    def _open(self) -> None:
        self.producer = Producer(self.opts.producer_config(**{"message.timeout.ms": millis(self.opts.retry_timeout)}))

    async def write(self, writes: Writes, upto: int | None) -> None:
        await self.lane.run(self._produce_write, writes, upto)

    def _produce_write(self, writes: Writes, upto: int | None) -> None:
        producer = self.producer
        assert producer is not None
        self._raise_failure()
        live = self.live(producer, writes)
        entry = _Write(len(live), upto)
        with self._lock:
            self._writes.append(entry)
        self.produce(producer, live, functools.partial(self._delivered, entry))
        producer.poll(0)
        self._advance()

    def _delivered(self, entry: _Write, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is not None:
                entry.errors.append((err, msg.topic() or ""))
            entry.left -= 1

    def _advance(self) -> None:
        """Move the offset to commit past the writes acknowledged in full, in order."""
        with self._lock:
            while self._writes and self._writes[0].left <= 0 and self._failed is None:
                entry = self._writes.popleft()
                gone = {t for e, t in entry.errors if e.code() in GONE_CODES and t not in self.own_topics}
                failed = [(e, t) for e, t in entry.errors if t not in gone]
                if gone:  # a reply topic deleted after the check: its results are dropped
                    self.drop([OutMessage(t, None, b"") for _, t in entry.errors if t in gone], gone)
                if failed:
                    self._failed = BrokerError(
                        f"{self.name}: {len(failed)} results not delivered to kafka at {self.opts.bootstrap_servers}, "
                        f"e.g. to {failed[0][1]!r}: {failed[0][0].str()}; the offset stays uncommitted"
                    )
                elif entry.upto is not None:
                    self.to_commit = entry.upto

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def commit_pending(self) -> None:
        """Commit the offset of what the brokers acknowledged (not waited for: commits go out in order,
        and one that is lost means only that the next runner answers a few requests again).  Called
        on the thread that polls the consumer (a commit from another would wait for the poll in
        progress); raises once a result was not delivered (the partition stops, its reads are redone)."""
        if self.producer is not None:
            self.producer.poll(0)  # delivery reports of writes no new write is serving
        self._advance()
        self._raise_failure()
        with self._lock:
            upto, self.to_commit = self.to_commit, None
        if upto is None:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.inbox, self.partition, upto)], asynchronous=True)
        except KafkaException as e:
            raise self.failure("committing the offset", e) from e

    @property
    def unacknowledged(self) -> int:
        """Writes whose results the brokers have not all acknowledged yet."""
        return len(self._writes)
