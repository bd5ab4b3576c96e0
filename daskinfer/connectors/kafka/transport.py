"""The client side of Kafka for :class:`~daskinfer.InferenceClient` (needs ``confluent-kafka``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport
from daskinfer.connectors.kafka.admin import delete_topic, ensure_topic
from daskinfer.connectors.kafka.link import KafkaOptions, Lane, kafka_error, millis, poll_messages
from daskinfer.exceptions import BrokerError, ConfigError, RequestTooLargeError, TopicFullError
from daskinfer.wire.codec import Encoded, as_bytes
from daskinfer.wire.frames import RequestColumns, decode_requests, encode_request_frame, peek_fields
from daskinfer.wire.result_frames import ErrorColumns, encode_result_frame

logger = logging.getLogger(__name__)


def fit_frames(data: bytes, limit: int) -> list[bytes]:
    """``data`` (a request frame or message) as messages of at most ``limit`` bytes: a frame that
    is larger is cut in halves, each encoded as a frame, until every part fits.

    Raises
    ------
    RequestTooLargeError
        One request alone is larger than ``limit``.
    """
    if len(data) <= limit:
        return [data]
    cols = decode_requests(data, max_size=len(data))
    if not cols.framed or len(cols) == 1:
        raise RequestTooLargeError(
            f"request {cols.ids[0]!r} is {len(data)} bytes, over kafka's message limit of {limit} bytes "
            f"(kafka.max-message-bytes); send its rows in smaller blocks, or raise the limit together with "
            f"the topics' max.message.bytes",
            request_id=cols.ids[0],
        )
    half = len(cols) // 2
    return fit_frames(_frame_of(cols, 0, half), limit) + fit_frames(_frame_of(cols, half, len(cols)), limit)


def _frame_of(cols: RequestColumns, a: int, b: int) -> bytes:
    """Requests ``a:b`` of ``cols`` as one frame."""
    if cols.rows is None:
        r0, r1, rows = a, b, None
    else:
        ends = np.cumsum(cols.rows)
        r0, r1, rows = int(ends[a - 1]) if a else 0, int(ends[b - 1]), cols.rows[a:b]
    cut = lambda v: None if v is None else v[a:b]  # noqa: E731
    frame = encode_request_frame(
        cols.ids[a:b],
        {k: v[r0:r1] for k, v in cols.inputs.items()},
        rows=rows,
        batched=cols.batched,
        keys=cut(cols.keys),
        model=cols.model,
        deadlines=cut(cols.deadlines),
        reply_to=cols.reply_to,
        sent_at=cut(cols.sent_at),
        budgets=cut(cols.budgets),
    )
    return as_bytes(frame)  # bytes already (not split): typed as such


class KafkaTransport(ClientTransport):
    """The client side of Kafka for :class:`~daskinfer.InferenceClient`.

    Requests go to the inbox topic's partitions through an idempotent producer, which keeps
    each partition's order with several requests in flight: a send returns once its requests are
    handed to the producer, and waits only while ``send_window`` sends are not yet acknowledged by
    the brokers.  A request the brokers do not take within ``send_timeout`` comes back as an error
    result (:class:`~daskinfer.exceptions.TopicFullError`, or ``BrokerError`` naming Kafka's error).
    A frame of requests over ``max_message_bytes`` is cut into frames that fit.  Results come
    back on a reply topic of this client's own (one partition, created by :meth:`start` with a retention, deleted by
    :meth:`close`): every request names it, as Kafka's request-reply pattern does, and each
    result carries the request id in its ``correlation_id`` header.

    Parameters
    ----------
    bootstrap_servers : str, optional
        ``host:port[,host:port...]``; config ``kafka.bootstrap-servers``.
    partitions : int, optional
        Partitions of an inbox that no pipeline created yet; config ``pipeline.partitions``.
        An existing inbox keeps its own.
    read_batch : int, optional
        Most results one read takes; config ``kafka.read-batch``.
    send_timeout : float or str, optional
        How long a request waits for the brokers to acknowledge it; config ``kafka.send-timeout``.
    send_window : int, optional
        Sends not yet acknowledged before the next one waits; config ``kafka.send-window``.
    isolation_level : {"read_committed", "read_uncommitted"}, optional
        How the reply topic is read; config ``kafka.isolation-level``.  ``read_uncommitted``
        sees results of exactly-once pipelines before their transaction commits (sooner), and
        may see results of aborted transactions (the client drops their repeats by request id).
    reply_retention : float or str, optional
        Retention of the reply topic (should the client die without deleting it); config
        ``kafka.reply-retention``.
    **options
        Other Kafka settings, e.g. ``client_config={"security.protocol": "SASL_SSL", ...}``
        (see :class:`~daskinfer.connectors.kafka.link.KafkaOptions`).

    Examples
    --------
    >>> ic = InferenceClient(client, inbox="requests", transport=KafkaTransport("127.0.0.1:9092"))  # doctest: +SKIP
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        partitions: int | None = None,
        read_batch: int | None = None,
        send_timeout: float | str | None = None,
        send_window: int | None = None,
        isolation_level: str | None = None,
        reply_retention: float | str | None = None,
        **options: Any,
    ):
        self.opts = KafkaOptions.resolve(options, bootstrap_servers=bootstrap_servers)
        self.partitions = partitions
        self.read_batch = int(settings.get("kafka.read-batch", read_batch))
        self.send_timeout = settings.get_seconds("kafka.send-timeout", send_timeout)
        self.send_window = int(settings.get("kafka.send-window", send_window))
        if self.send_window < 1:
            raise ConfigError(f"kafka send_window must be >= 1, got {self.send_window}")
        self.isolation_level = str(settings.get("kafka.isolation-level", isolation_level))
        self.reply_retention = settings.get_seconds("kafka.reply-retention", reply_retention)
        self.sender = Lane("kafka-send")
        self.receiver = Lane("kafka-receive")
        self.admin: AdminClient | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.reply_topic: str | None = None
        self._lock = threading.Lock()  # delivery reports run on whichever lane polls the producer
        self._open_sends = 0  # sends with requests not yet acknowledged
        self.peak_in_flight = 0  # most sends not yet acknowledged at once
        self._failed: list[bytes] = []  # error results for requests the brokers did not take
        self.undelivered = 0
        self._closed = False

    async def start(self, inbox: str, reply_topic: str) -> int:
        return await self.sender.run(self._start, inbox, reply_topic)

    def _start(self, inbox: str, reply_topic: str) -> int:
        opts = self.opts
        self.admin = AdminClient(opts.librdkafka())
        n = ensure_topic(self.admin, inbox, int(settings.get("pipeline.partitions", self.partitions)), opts)
        ensure_topic(self.admin, reply_topic, 1, opts, config={"retention.ms": str(millis(self.reply_retention))})
        self.reply_topic = reply_topic
        self.producer = Producer(
            opts.producer_config(
                **{
                    "message.timeout.ms": millis(self.send_timeout),
                }
            )
        )
        self.consumer = Consumer(
            opts.librdkafka(
                **{
                    "group.id": reply_topic,  # nothing is committed: the topic is this client's alone
                    "enable.auto.commit": False,
                    "isolation.level": self.isolation_level,
                }
            )
        )
        self.consumer.assign([TopicPartition(reply_topic, 0, OFFSET_BEGINNING)])
        return n

    async def send(self, inbox: str, items: list[tuple[int, Encoded]]) -> None:
        """Hand requests to the producer for their inbox partitions; wait while ``send_window``
        earlier sends are not yet acknowledged by the brokers."""
        await self.sender.run(self._send, inbox, [(p, as_bytes(data)) for p, data in items])

    def _send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        producer = self.producer
        assert producer is not None, "KafkaTransport.start was not called"
        deadline = time.monotonic() + self.send_timeout
        while self._open_sends >= self.send_window:
            producer.poll(0.002)  # delivery reports close sends
            if time.monotonic() > deadline:  # (each message also times out by itself)
                raise TopicFullError(
                    f"kafka topic {inbox!r}: {self._open_sends} sends not acknowledged by "
                    f"{self.opts.bootstrap_servers} within {self.send_timeout:g}s (kafka.send-timeout)"
                )
        messages = []
        limit = self.opts.max_message_bytes
        for p, data in items:
            messages += [(p, part) for part in (fit_frames(data, limit) if len(data) > limit else (data,))]
        if not messages:
            return
        left = [len(messages)]
        with self._lock:
            self._open_sends += 1
            self.peak_in_flight = max(self.peak_in_flight, self._open_sends)

        def delivered(err: KafkaError | None, msg: Message) -> None:
            with self._lock:
                if err is not None:
                    self._undelivered(inbox, err, msg)
                left[0] -= 1
                if left[0] == 0:
                    self._open_sends -= 1

        for p, data in messages:
            self._produce(inbox, data, p, delivered)
        producer.poll(0)

    @property
    def in_flight(self) -> int:
        """Sends not yet acknowledged by the brokers."""
        return self._open_sends

    def _undelivered(self, inbox: str, err: KafkaError, msg: Message) -> None:
        """A request the brokers did not take: its requests get an error result (under the lock)."""
        self.undelivered += 1
        fields = peek_fields(msg.value() or b"")
        ids = fields.get("ids") or ([fields["id"]] if isinstance(fields.get("id"), str) else [])
        if not ids:
            return
        timed_out = err.code() == KafkaError._MSG_TIMED_OUT
        kind = TopicFullError.__name__ if timed_out else BrokerError.__name__
        why = (
            f"kafka topic {inbox!r} partition {msg.partition()}: the brokers at {self.opts.bootstrap_servers} did not "
            + (
                f"acknowledge the request within {self.send_timeout:g}s (kafka.send-timeout)"
                if timed_out
                else "take it"
            )
            + f": {err.str()}"
        )
        n = len(ids)
        self._failed.append(as_bytes(encode_result_frame([], None, errors=ErrorColumns(ids, [kind] * n, [why] * n))))

    def _produce(self, inbox: str, data: bytes, partition: int, on_delivery: Any) -> None:
        producer = self.producer
        assert producer is not None
        while True:
            try:
                producer.produce(inbox, data, partition=partition, on_delivery=on_delivery)
                return
            except BufferError:  # librdkafka's queue is full: let it send
                producer.poll(0.01)

    async def receive(self, timeout: float) -> list[bytes]:
        """Results on the reply topic after the last one returned, waiting up to ``timeout`` s for the first."""
        return await self.receiver.run(self._receive, timeout)

    def _receive(self, timeout: float) -> list[bytes]:
        assert self.consumer is not None and self.reply_topic is not None, "KafkaTransport.start was not called"
        assert self.producer is not None
        self.producer.poll(0)  # delivery reports of sends no new send is waiting on
        with self._lock:
            failed, self._failed = self._failed, []
        if failed:
            return failed
        msgs = poll_messages(
            self.consumer, self.read_batch, timeout, lambda: self._closed, f"reply topic {self.reply_topic!r}"
        )
        return [m.value() or b"" for m in msgs]

    async def ack(self) -> None:
        """Nothing to do: the reply topic is this client's own, deleted by :meth:`close`."""

    async def close(self) -> None:
        """Delete the reply topic, close producer and consumer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.receiver.run(lambda: None)  # after any poll in progress
            await self.sender.run(self._close)
        finally:
            self.sender.shutdown()
            self.receiver.shutdown()

    def _close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if self.producer is not None:
            self.producer.flush(min(1.0, self.send_timeout))
        if self.admin is not None and self.reply_topic is not None:
            try:
                delete_topic(self.admin, self.reply_topic, self.opts.operation_timeout)
            except KafkaException as e:  # the brokers are gone: the topic's retention cleans up
                logger.warning("could not delete reply topic %r: %s", self.reply_topic, kafka_error(e) or e)
