"""The client side of Redis Streams for :class:`~daskinfer.InferenceClient`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, TypeVar

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport
from daskinfer.connectors.redis.consumer import RedisConnector, prepare_streams
from daskinfer.connectors.redis.framing import as_str, next_entry_id, pack_messages, unpack_messages
from daskinfer.connectors.redis.link import CONNECTION_ERRORS, RedisLink, redis_url
from daskinfer.connectors.redis.scripts import fence_key, inbox_stream, meta_key, sends_key
from daskinfer.exceptions import ConfigError, TopicFullError
from daskinfer.wire.codec import Encoded, as_bytes
from daskinfer.wire.frames import peek_fields
from daskinfer.wire.result_frames import ErrorColumns, encode_result_frame

SENDS_TTL = 86400  # seconds the order of a client's sends is kept after its last send (then it is forgotten)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisTransport(ClientTransport):
    """The client side of Redis Streams for :class:`~daskinfer.InferenceClient`.

    Requests go to the inbox partition streams, several sends in flight at once (``send_window``)
    and each partition's in the order they were made (a sequenced ``XADD`` script); a send waits
    while its stream is at its bound.  Results come from this client's reply stream, read with
    ``XREAD BLOCK`` from the last id seen and deleted once delivered.

    Parameters
    ----------
    url : str, optional
        ``redis://[:password@]host:port/db`` or ``rediss://...``; config ``redis.url``.
    partitions : int, optional
        Partitions of an inbox that no pipeline created yet; config ``pipeline.partitions``.
        An existing inbox keeps its own.
    max_stream_length : int, optional
        Entries a partition stream may hold before a send waits; config ``redis.max-stream-length``.
    put_timeout : float or str, optional
        How long a send waits for room, then :class:`~daskinfer.exceptions.TopicFullError`;
        config ``redis.put-timeout``.
    read_batch : int, optional
        Most results one read takes; config ``redis.read-batch``.
    send_window : int, optional
        Sends in flight at once (each one partition's share of a flush); config ``redis.send-window``.
    **options
        ``password``, ``username``, ``ssl_ca_certs``..., and ``reconnect_timeout`` etc.

    Examples
    --------
    >>> transport = RedisTransport("redis://127.0.0.1:6379/0")
    >>> ic = InferenceClient(client, inbox="requests", transport=transport)  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        partitions: int | None = None,
        max_stream_length: int | None = None,
        put_timeout: float | str | None = None,
        read_batch: int | None = None,
        send_window: int | None = None,
        **options: Any,
    ):
        self.options = options
        self.url = redis_url(options, url)
        self.partitions = partitions
        self.max_stream_length = int(settings.get("redis.max-stream-length", max_stream_length))
        self.put_timeout = settings.get_seconds("redis.put-timeout", put_timeout)
        self.read_batch = int(settings.get("redis.read-batch", read_batch))
        self.full_poll_max = settings.get_seconds("redis.full-poll-max", options.get("full_poll_max"))
        self.link: RedisLink | None = None
        self.reply_topic: str | None = None
        self._last = "0-0"
        self._acked = "0-0"
        self._trim = ""
        self.full_waits = 0
        self.send_window = int(settings.get("redis.send-window", send_window))
        if self.send_window < 1:
            raise ConfigError(f"redis send_window must be >= 1, got {self.send_window}")
        self.client_id = uuid.uuid4().hex[:16]  # orders this client's sends to each partition stream
        self._seqs: dict[int, int] = {}
        self._jobs: set[asyncio.Task] = set()
        self._last_job: dict[int, asyncio.Task] = {}
        self._failed: list[bytes] = []  # error results of requests that found no room
        self.refused = 0
        self.peak_in_flight = 0

    async def start(self, inbox: str, reply_topic: str) -> int:
        self.link = link = RedisLink(self.url, self.options, f"client of {inbox!r}")
        meta = meta_key(inbox)
        default = int(settings.get("pipeline.partitions", self.partitions))

        async def partitions() -> int:
            pipe = link.redis.pipeline(transaction=True)
            pipe.hsetnx(meta, "partitions", default)
            pipe.hget(meta, "partitions")
            return int((await pipe.execute())[1])

        n = await link.retry("start", partitions)
        await link.retry("start", lambda: link.script("ensure", (reply_topic,), ()))
        self.reply_topic = reply_topic
        return n

    async def send(self, inbox: str, items: list[tuple[int, Encoded]]) -> None:
        """Hand requests to their partition streams: one send per partition, several in flight at once
        (at most ``send_window``; then this waits for the oldest).  Sends to one partition land in the
        order they were made (the ``put_seq`` script orders them); one that waits at a full stream for
        longer than ``put_timeout`` fails its requests with a ``TopicFullError`` result (from
        :meth:`receive`) and lets the next ones land."""
        link = self.link
        assert link is not None, "RedisTransport.start was not called"
        by_part: dict[int, list[bytes]] = {}
        for p, data in items:
            by_part.setdefault(p, []).append(as_bytes(data))
        for p, datas in by_part.items():
            while len(self._jobs) >= self.send_window:
                await asyncio.wait(set(self._jobs), return_when=asyncio.FIRST_COMPLETED)
            seq = self._seqs.get(p, 0)
            self._seqs[p] = seq + 1
            job = asyncio.ensure_future(self._put(inbox, p, seq, datas, self._last_job.get(p)))
            self._jobs.add(job)
            self._last_job[p] = job
            job.add_done_callback(self._jobs.discard)
            self.peak_in_flight = max(self.peak_in_flight, len(self._jobs))

    async def _put(self, inbox: str, p: int, seq: int, datas: list[bytes], before: asyncio.Task | None) -> None:
        link = self.link
        assert link is not None
        stream, sends = inbox_stream(inbox, p), sends_key(inbox, p)
        packed, big = pack_messages(datas)
        args = (self.max_stream_length, self.client_id, seq, SENDS_TTL, len(datas), len(big), packed, *big)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.put_timeout
        delay, done = 0.001, 0
        while True:
            status, total = await link.retry("send", lambda: link.script("put_seq", (stream, sends), args))
            if status == -1 or total == len(datas):
                return
            if status == -2 and before is not None and not before.done():
                await asyncio.wait({before})  # the earlier send of this partition first
                continue
            if total > done:
                done, delay = total, 0.001
                deadline = loop.time() + self.put_timeout  # the pipeline drains it: keep going
                continue
            left = deadline - loop.time()
            if left <= 0:
                await link.retry("send", lambda: link.script("put_skip", (sends,), (self.client_id, seq)))
                self._fail(datas[total:], stream, total, len(datas))
                return
            self.full_waits += 1
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.full_poll_max)

    def _fail(self, datas: list[bytes], stream: str, appended: int, count: int) -> None:
        """Error results for the requests of a send that found no room within ``put_timeout``."""
        why = (
            f"redis inbox stream {stream!r} stayed at its bound of {self.max_stream_length} entries "
            f"(redis.max-stream-length) for {self.put_timeout:g}s (redis.put-timeout); {appended} of {count} "
            "requests of this send were appended. Is a pipeline consuming it?"
        )
        for data in datas:
            fields = peek_fields(data)
            ids = fields.get("ids") or ([fields["id"]] if isinstance(fields.get("id"), str) else [])
            if ids:
                n = len(ids)
                frame = encode_result_frame(
                    [], None, errors=ErrorColumns(ids, [TopicFullError.__name__] * n, [why] * n)
                )
                self._failed.append(as_bytes(frame))
                self.refused += n

    @property
    def in_flight(self) -> int:
        """Sends not yet all in their streams."""
        return len(self._jobs)

    async def receive(self, timeout: float) -> list[bytes]:
        """Results after the last one returned; waits with ``XREAD BLOCK`` when there are none.

        Entries delivered before (see :meth:`ack`) are deleted in the same round trip.
        """
        link = self.link
        assert link is not None and self.reply_topic is not None, "RedisTransport.start was not called"
        topic = self.reply_topic
        if self._failed:
            failed, self._failed = self._failed, []
            return failed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            last, trim = self._last, self._trim
            reply = await link.retry("receive", lambda: link.script("fetch", (topic,), (last, self.read_batch, trim)))
            self._trim = ""
            if reply:
                self._last = as_str(reply[0])
                return unpack_messages(reply[1], reply[2:])
            left = deadline - loop.time()
            if left <= 0:
                return []
            woke = await link.retry(
                "receive", lambda: link.redis.xread({topic: last}, count=1, block=link.block_ms(left))
            )
            if not woke:
                return []

    async def ack(self) -> None:
        """The results returned so far are delivered: the next read deletes them (exact ``XTRIM MINID``)."""
        if self._last != self._acked:
            self._acked = self._last
            self._trim = next_entry_id(self._last)

    async def close(self) -> None:
        link = self.link
        if link is None:
            return
        if self._jobs:  # sends on their way land first (each gives up after put_timeout)
            await asyncio.wait(set(self._jobs))
        try:
            if self.reply_topic is not None and not link.closed:
                await link.redis.delete(self.reply_topic)
        except CONNECTION_ERRORS as e:  # pragma: no cover - server gone
            logger.warning("could not delete reply stream %r: %s", self.reply_topic, e)
        finally:
            await link.aclose()


__all__ = ["RedisConnector", "RedisTransport", "fence_key", "inbox_stream", "meta_key", "prepare_streams"]
