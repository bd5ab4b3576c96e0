"""A partition runner's access to Redis Streams (see :mod:`daskinfer.connectors.redis`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from daskinfer.connectors.base import Connector, Messages, OutMessage, PartitionRevoked
from daskinfer.connectors.redis.framing import (
    as_str,
    last_xread_id,
    more_fields,
    pack_messages,
    unpack_entries,
)
from daskinfer.connectors.redis.link import CONNECTION_ERRORS, RedisLink, redact_url, redis_option, redis_url
from daskinfer.connectors.redis.scripts import (
    CLAIM_COUNT,
    fence_key,
    inbox_stream,
    meta_key,
)
from daskinfer.exceptions import BrokerError, ConfigError
from daskinfer.wire.codec import as_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisConnector(Connector):
    """A partition runner's access to Redis Streams: one inbox partition stream, read in a group.

    Parameters
    ----------
    spec : dict
        The pipeline spec (:meth:`daskinfer.Pipeline.to_spec`): ``name`` (the consumer group),
        ``inbox``, ``outbox``, ``dead_letter``, ``connector_options`` (``url`` and overrides of
        the ``redis.*`` config in snake case, e.g. ``outbox_max_length``) and, set by
        :func:`prepare_streams`, ``redis_generation``.
    partition : int
        The inbox partition this runner serves.
    epoch : int
        The controller's epoch of this assignment; with the deployment's generation it makes the
        fencing token: a runner with a higher token supersedes this one.
    consumer : str, optional
        Where the runner lives (for logs and :meth:`describe`).
    """

    def __init__(self, spec: dict[str, Any], partition: int, epoch: int, consumer: str | None = None):
        self.options: dict[str, Any] = dict(spec.get("connector_options") or {})
        self.group: str = spec["name"]
        self.inbox: str = spec["inbox"]
        self.outbox: str = spec["outbox"]
        self.dead_letter: str | None = spec.get("dead_letter")
        self.record_topics: set[str] = set(spec.get("record_topics") or ())
        self.partition = partition
        self.epoch = epoch
        self.generation = int(spec.get("redis_generation") or self.options.get("redis_generation") or 0)
        self.token = str(self.generation * 10**9 + epoch)
        self.owner = consumer
        self.stream = inbox_stream(self.inbox, partition)
        self.fence = fence_key(self.inbox, partition, self.group)
        self.consumer = f"{self.group}-p{partition}-e{epoch}-g{self.generation}"
        self.outbox_max_length = int(redis_option(self.options, "outbox_max_length", "outbox-max-length"))
        self.dead_letter_max_length = int(
            redis_option(self.options, "dead_letter_max_length", "dead-letter-max-length")
        )
        self.link = RedisLink(redis_url(self.options), self.options, f"partition {partition} of {self.stream!r}")
        self._keys = (self.stream, self.fence)
        self._inflight: set[str] = set()  # read, not yet committed
        self._history: str | None = None  # re-reading own pending entries after this id
        self._cursor = "0-0"  # last id delivered to this group (for the blocking wait)
        self.claimed = 0
        self.dropped = 0
        self.read_count = 0
        self.committed = 0

    def _revoked(self) -> PartitionRevoked:
        return PartitionRevoked(
            f"partition {self.partition} of redis stream {self.stream!r} (group {self.group!r}) moved to a newer "
            f"runner than {self.consumer!r}"
        )

    async def start(self) -> None:
        """Take the partition (fencing older runners), claim their pending entries, serve those first."""
        link = self.link
        ok = await link.retry("start", lambda: link.script("start", self._keys, (self.group, self.token)))
        if not ok:
            raise self._revoked()
        claimed = 0
        cursor = "0-0"
        while True:
            reply = await link.retry(
                "claim",
                lambda: link.script("claim", self._keys, (self.group, self.consumer, self.token, cursor, CLAIM_COUNT)),
            )
            if reply == -1:
                raise self._revoked()
            cursor = as_str(reply[0])
            claimed += int(reply[1])
            if cursor == "0-0":
                break
        self.claimed = claimed
        groups = await link.retry("xinfo", lambda: link.redis.xinfo_groups(self.stream))
        for g in groups:
            if as_str(g.get("name")) == self.group:
                self._cursor = as_str(g.get("last-delivered-id", "0-0"))
        consumers = await link.retry("xinfo", lambda: link.redis.xinfo_consumers(self.stream, self.group))
        for c in consumers:
            name = as_str(c.get("name"))
            if name != self.consumer and int(c.get("pending", 0)) == 0:
                await link.retry("delconsumer", lambda: link.redis.xgroup_delconsumer(self.stream, self.group, name))
        self._history = "0-0"
        if claimed:
            logger.info(
                "%s took over %d pending entries of %r from earlier runners", self.consumer, claimed, self.stream
            )

    async def _read_once(self, count: int) -> tuple[str, Any]:
        from_id = ">" if self._history is None else self._history
        try:
            reply = await self.link.script("read", self._keys, (self.group, self.consumer, self.token, count, from_id))
        except CONNECTION_ERRORS:
            # Redis may have delivered entries whose reply we lost: re-read our pending ones first
            self._history = "0-0"
            raise
        return from_id, reply

    async def read(self, max_messages: int, timeout: float) -> Messages:
        """Pending entries of this consumer first (taken over or possibly lost in a reply), then new ones."""
        if self.link.closed:
            raise PartitionRevoked(f"{self.consumer}: connector closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        link = self.link
        while True:
            reply_id, reply = await link.retry("read", lambda: self._read_once(max_messages))
            history = None if reply_id == ">" else reply_id
            if reply == -1:
                raise self._revoked()
            payloads: list[bytes] = []
            ids: list[str] = []
            gone: list[str] = []
            metas: list[dict[str, Any] | None] = []
            inflight = self._inflight
            last = None
            for eid, data, meta in unpack_entries(reply):
                last = eid
                if history is not None and eid in inflight:
                    continue  # read before the reconnect and still being processed
                if data is None:
                    gone.append(eid)
                    continue
                inflight.add(eid)
                payloads.append(data)
                ids.append(eid)
                metas.append(meta)
            if history is not None:
                self._history = last  # None when the history is exhausted: on to new entries
            elif last is not None:
                self._cursor = last
            if gone:
                logger.warning(
                    "%s: %d pending entries of %r were deleted before they were processed: %s",
                    self.consumer,
                    len(gone),
                    self.stream,
                    gone[:5],
                )
                await self.write_and_commit([], [Messages([], gone)])
            if payloads:
                self.read_count += len(payloads)
                return Messages(payloads, ids, metas if any(m is not None for m in metas) else None)
            if last is not None or history is not None:
                continue
            left = deadline - loop.time()
            if left <= 0:
                return Messages([], [])
            # wait for entries after the last one delivered to this group, without taking any
            cursor = self._cursor
            woke = await link.retry(
                "wait", lambda: link.redis.xread({self.stream: cursor}, count=1, block=link.block_ms(left))
            )
            if not woke:
                return Messages([], [])
            self._cursor = last_xread_id(woke, self._cursor)  # (a '>' read always starts after it anyway)

    async def write_and_commit(self, writes: Sequence[OutMessage], done: Sequence[Messages]) -> None:
        """Append results and dead letters, then acknowledge and delete the entries of the reads ``done``.

        One script, so one round trip, and atomic: the entries are acknowledged exactly when
        their results are written.  Results for a reply stream that is gone are dropped.
        """
        ids = [eid for m in done for eid in m.positions]
        if not writes and not ids:
            return
        if self.link.closed:
            raise PartitionRevoked(f"{self.consumer}: connector closed")
        # per topic, runs of messages with the same more fields (a v2 answer's content-type), in order
        by_topic: dict[str, list[tuple[tuple[tuple[str, str], ...], list[bytes]]]] = {}
        for w in writes:
            runs = by_topic.setdefault(w.target, [])
            if runs and runs[-1][0] == w.headers:
                runs[-1][1].append(as_bytes(w.data))
            else:
                runs.append((w.headers, [as_bytes(w.data)]))
        keys: list[str] = [self.stream, self.fence]
        args: list[Any] = [self.group, self.token, " ".join(ids)]
        for topic, runs in by_topic.items():
            if topic == self.outbox or topic in self.record_topics:
                maxlen, create = self.outbox_max_length, 1
            elif topic == self.dead_letter:
                maxlen, create = self.dead_letter_max_length, 1
            else:  # a client's reply stream: only while it exists
                maxlen, create = self.outbox_max_length, 0
            for more, datas in runs:
                packed, big = pack_messages(datas)
                keys.append(topic)
                args += [maxlen, create, more_fields(more), len(big), packed, *big]
        link = self.link
        reply = await link.retry("write", lambda: link.script("deliver", keys, args))
        if reply == -1:
            raise self._revoked()
        if reply:
            gone = sorted({keys[k + 1] for k in reply})
            self.dropped += sum(len(datas) for t in gone for _, datas in by_topic[t])
            logger.warning(
                "%s: results for reply streams %s dropped: the streams are gone (clients that left)",
                self.consumer,
                gone,
            )
        if ids:
            self._inflight.difference_update(ids)
            self.committed += len(ids)

    async def backlog(self) -> int:
        """Entries waiting in this partition's stream (read or not, not yet acknowledged)."""
        link = self.link
        return int(await link.retry("xlen", lambda: link.redis.xlen(self.stream)))

    async def close(self) -> None:
        await self.link.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "consumer": self.consumer,
            "owner": self.owner,
            "claimed": self.claimed,
            "position": self.read_count,
            "committed": self.committed,
            "inflight_entries": len(self._inflight),
            "dropped": self.dropped,
            "reconnects": self.link.reconnects,
        }


async def prepare_streams(spec: dict[str, Any], timeout: float | None = None) -> None:
    """Create a pipeline's inbox partition streams with its consumer group, its outbox and dead-letter streams.

    Also starts a new deployment generation of the pipeline and records it in
    ``spec["redis_generation"]``: the runners of this deployment outrank (fence) any runner
    left from an earlier one.

    Parameters
    ----------
    spec : dict
        The pipeline spec (:meth:`daskinfer.Pipeline.to_spec`), ``connector_options["url"]``
        or config ``redis.url`` naming the server.
    timeout : float, optional
        Longest wait for Redis, in seconds (default: config ``redis.reconnect-timeout``).

    Raises
    ------
    BrokerError
        Redis cannot be reached (at once, without retries), refuses the credentials, or does
        not answer within ``timeout``; the message names the URL (without its password).
    ConfigError
        The inbox exists with another number of partitions.
    """
    options = dict(spec.get("connector_options") or {})
    url = redis_url(options)
    what = f"pipeline {spec['name']!r}"
    link = RedisLink(url, options, what)
    timeout = link.reconnect_timeout if timeout is None else min(timeout, link.reconnect_timeout)
    link.reconnect_timeout = timeout
    try:
        await asyncio.wait_for(_prepare_streams(link, spec), timeout)
    except asyncio.TimeoutError:
        raise BrokerError(f"{what}: no answer from Redis at {redact_url(url)} within {timeout:g}s") from None
    finally:
        await link.aclose()


async def _prepare_streams(link: RedisLink, spec: dict[str, Any]) -> None:
    await link.check()
    inbox, group, n = spec["inbox"], spec["name"], int(spec["partitions"])
    meta = meta_key(inbox)

    async def setup() -> int:
        pipe = link.redis.pipeline(transaction=True)
        pipe.hsetnx(meta, "partitions", n)
        pipe.hget(meta, "partitions")
        pipe.hincrby(meta, f"generation:{group}", 1)
        _, have, gen = await pipe.execute()
        if int(have) != n:
            raise ConfigError(
                f"pipeline {group!r}: redis inbox {inbox!r} exists with {int(have)} partitions, not {n} "
                f"(recorded in {meta!r})"
            )
        return int(gen)

    spec["redis_generation"] = await link.retry("prepare", setup)
    for p in range(n):
        try:
            await link.retry(
                "xgroup", lambda: link.redis.xgroup_create(inbox_stream(inbox, p), group, id="0", mkstream=True)
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
    topics = [t for t in (spec.get("outbox"), spec.get("dead_letter"), *(spec.get("record_topics") or ())) if t]
    await link.retry("ensure", lambda: link.scripts([("ensure", (t,), ()) for t in topics]))
