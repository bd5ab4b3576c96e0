"""The client side of Redis Streams for :class:`~daskinfer.InferenceClient`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport
from daskinfer.connectors.redis.consumer import RedisConnector, prepare_streams
from daskinfer.connectors.redis.framing import as_str, next_entry_id, pack_messages, unpack_messages
from daskinfer.connectors.redis.link import CONNECTION_ERRORS, RedisLink, redis_url
from daskinfer.connectors.redis.scripts import fence_key, inbox_stream, meta_key
from daskinfer.exceptions import TopicFullError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisTransport(ClientTransport):
    """The client side of Redis Streams for :class:`~daskinfer.InferenceClient`.

    Requests go to the inbox partition streams (one ``XADD`` script per partition, all in one
    round trip, waiting while a partition is at its bound); results come from this client's
    reply stream, read with ``XREAD BLOCK`` from the last id seen and deleted once delivered.

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

    async def send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        """Append requests to their partition streams; wait (never drop) while a stream is at its bound."""
        link = self.link
        assert link is not None, "RedisTransport.start was not called"
        by_part: dict[int, list[bytes]] = {}
        for p, data in items:
            by_part.setdefault(p, []).append(data)
        done = dict.fromkeys(by_part, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.put_timeout
        delay = 0.001
        bound = self.max_stream_length
        while True:
            parts = [p for p in by_part if done[p] < len(by_part[p])]
            if not parts:
                return
            calls: list[tuple[str, Sequence[Any], Sequence[Any]]] = []
            for p in parts:
                packed, big = pack_messages(by_part[p][done[p] :])
                calls.append(("put", (inbox_stream(inbox, p),), (bound, len(big), packed, *big)))
            added = await link.retry("send", lambda: link.scripts(calls))
            progress = False
            for p, n in zip(parts, added):
                done[p] += int(n)
                progress = progress or n > 0
            if all(done[p] == len(by_part[p]) for p in parts):
                return
            if progress:
                deadline = loop.time() + self.put_timeout  # the pipeline drains it: keep going
                delay = 0.001
                continue
            left = deadline - loop.time()
            if left <= 0:
                full = [p for p in parts if done[p] < len(by_part[p])]
                raise TopicFullError(
                    f"redis inbox {inbox!r}: partition streams {[inbox_stream(inbox, p) for p in full]} stayed at "
                    f"their bound of {bound} entries (redis.max-stream-length) for {self.put_timeout:g}s "
                    "(redis.put-timeout); "
                    f"{sum(done.values())} of {len(items)} requests were appended. Is a pipeline consuming {inbox!r}?"
                )
            self.full_waits += 1
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.full_poll_max)

    async def receive(self, timeout: float) -> list[bytes]:
        """Results after the last one returned; waits with ``XREAD BLOCK`` when there are none.

        Entries delivered before (see :meth:`ack`) are deleted in the same round trip.
        """
        link = self.link
        assert link is not None and self.reply_topic is not None, "RedisTransport.start was not called"
        topic = self.reply_topic
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
        try:
            if self.reply_topic is not None and not link.closed:
                await link.redis.delete(self.reply_topic)
        except CONNECTION_ERRORS as e:  # pragma: no cover - server gone
            logger.warning("could not delete reply stream %r: %s", self.reply_topic, e)
        finally:
            await link.aclose()


__all__ = ["RedisConnector", "RedisTransport", "fence_key", "inbox_stream", "meta_key", "prepare_streams"]
