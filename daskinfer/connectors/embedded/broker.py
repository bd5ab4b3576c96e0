"""The embedded broker: topics with partitions hosted by the Dask scheduler.

It needs nothing but the Dask cluster.  Since requests from daskinfer's client go
straight to the workers (:mod:`daskinfer.connectors.direct`), these topics are for
what needs a log that outlives a client: inbox topics that other producers write to,
the outbox, dead-letter and shadow topics that others read, and reply topics of
clients that use the topic transport.

- **Inbox** topics are bounded in messages and bytes and push back on producers (they
  wait up to ``broker.put-timeout``, then get
  :class:`~daskinfer.exceptions.TopicFullError`); consumers read by offset and commit
  per group; nothing is dropped.
- **Retained** topics (outbox, dead-letter, shadow, replies) never push back on a
  pipeline: past their bounds or age the oldest messages are dropped and counted.  A
  reply topic whose client stops reading for ``broker.reply-ttl`` is deleted.

Every call moves many messages (batched RPCs on the scheduler's comm).  Topic settings
are resolved on the client that creates the topic and travel with the call, so the
scheduler's own config does not change them.  Install with :func:`ensure_broker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from daskinfer import settings
from daskinfer.connectors.base import partition_for
from daskinfer.connectors.embedded.sweeper import Sweeper
from daskinfer.connectors.embedded.topics import Topic, TopicSettings, wait_for_wake
from daskinfer.exceptions import RequestTooLargeError, TopicFullError, TopicNotFoundError

if TYPE_CHECKING:
    from distributed import Client, Scheduler

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskinfer-broker"
EXTENSION = "daskinfer-broker"


class BrokerExtension:
    """Scheduler-side state and RPC handlers of the embedded broker."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.topics: dict[str, Topic] = {}
        self.missing_writes = 0  # results for topics that are gone (clients that left)
        scheduler.handlers.update(
            {
                "daskinfer_topic_create": self.create_topic,
                "daskinfer_topic_delete": self.delete_topic,
                "daskinfer_topic_info": self.topic_info,
                "daskinfer_topic_list": self.list_topics,
                "daskinfer_put": self.put,
                "daskinfer_write": self.write,
                "daskinfer_get": self.get,
                "daskinfer_commit": self.commit,
                "daskinfer_assign": self.assign,
            }
        )
        self.sweeper = Sweeper(self.topics, self.delete_topic)

    def teardown(self) -> None:
        """Stop the sweeper (the scheduler calls this when it closes)."""
        self.sweeper.stop()

    def sweep(self, now: float | None = None) -> list[str]:
        """Expire retained messages by age; delete reply topics nobody read for their ttl (see :class:`Sweeper`)."""
        return self.sweeper.sweep(now)

    def _topic(self, name: str) -> Topic:
        try:
            return self.topics[name]
        except KeyError:
            raise TopicNotFoundError(f"topic {name!r} does not exist; topics: {sorted(self.topics)}") from None

    def create_topic(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a topic (no-op if it exists); return its settings (those of the existing one)."""
        if name in self.topics:
            return asdict(self.topics[name].settings)
        ts = TopicSettings(**spec)
        self.topics[name] = Topic(name, ts)
        return asdict(ts)

    def delete_topic(self, name: str) -> bool:
        topic = self.topics.pop(name, None)
        if topic:
            topic.wake_all()
        return topic is not None

    def topic_info(self, name: str) -> dict[str, Any]:
        t = self._topic(name)
        return {
            "partitions": len(t.logs),
            "start": [log.start for log in t.logs],
            "end": [log.end for log in t.logs],
            "bytes": [log.bytes for log in t.logs],
            "committed": [dict(log.committed) for log in t.logs],
            "dropped": t.dropped,
            "settings": asdict(t.settings),
        }

    def list_topics(self) -> dict[str, dict[str, Any]]:
        return {
            n: {
                "partitions": len(t.logs),
                "messages": sum(len(lg) for lg in t.logs),
                "bytes": sum(lg.bytes for lg in t.logs),
                "dropped": t.dropped,
                "kind": "reply" if t.settings.ttl is not None else ("retained" if t.settings.retain else "inbox"),
            }
            for n, t in self.topics.items()
        }

    async def put(self, topic: str, messages: list, timeout: float | None = None) -> int:
        """Append ``[[partition, data], ...]``; wait for room (inbox topics); return how many were appended."""
        t = self._topic(topic)
        timeout = settings.get_seconds("broker.put-timeout", timeout)
        limit = t.settings.max_message_size
        by_part: dict[int, list[bytes]] = {}
        n_parts = len(t.logs)
        for p, data in messages:
            if len(data) > limit:
                raise RequestTooLargeError(
                    f"topic {topic!r}: a message of {len(data)} bytes is over the limit of {limit} bytes"
                )
            by_part.setdefault(p % n_parts, []).append(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for p, datas in by_part.items():
            log = t.logs[p]
            i = 0
            while i < len(datas):
                room = log.room(len(datas[i]))
                if room:
                    take = datas[i : i + room]
                    if not t.settings.retain:  # an inbox partition also stops at its byte bound
                        size, k = log.bytes, 0
                        for k, m in enumerate(take):
                            size += len(m)
                            if size > log.max_bytes and k:
                                take = take[:k]
                                break
                    log.append(take)
                    i += len(take)
                    Topic.wake(t.data_waiters[p])
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    raise TopicFullError(
                        f"topic {topic!r} partition {p} stayed full ({len(log)} messages, {log.bytes} bytes; "
                        f"bounds {log.max_messages} messages, {log.max_bytes} bytes) for {timeout:g}s; "
                        f"{i} of {len(datas)} messages for it were appended"
                    )
                await wait_for_wake(t.room_waiters[p], left)
                if topic not in self.topics:
                    raise TopicNotFoundError(f"topic {topic!r} was deleted")
        return len(messages)

    async def write(
        self, puts: list, fallback: int = 0, commit: dict | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """A partition's output in one call: append ``[[topic, [[key, data], ...]], ...]`` (keys pick
        partitions), then commit ``commit`` (topic, partition, group, offset, epoch).

        A runner whose epoch was superseded writes nothing (``revoked``): the new owner
        redoes its uncommitted requests, and their answers must not appear twice.
        Topics that no longer exist (a client that left) are skipped and named in ``missing``.
        """
        missing: list[str] = []
        if commit is not None and not self._fresh(commit):
            return {"missing": missing, "revoked": True}  # a fenced runner writes nothing
        for topic, rows in puts:
            if commit is not None and not self._fresh(commit):  # reassigned while we waited for room
                return {"missing": missing, "revoked": True}
            t = self.topics.get(topic)
            if t is None:
                missing.append(topic)
                self.missing_writes += len(rows)
                continue
            n = len(t.logs)
            await self.put(topic, [(partition_for(k, n, fallback), d) for k, d in rows], timeout=timeout)
        reply: dict[str, Any] = {"missing": missing}
        if commit is not None:
            reply.update(self.commit(**commit))
        return reply

    def _fresh(self, commit: dict[str, Any]) -> bool:
        t = self.topics.get(commit["topic"])
        return t is not None and self._check_epoch(t, commit["group"], commit["partition"], commit.get("epoch"))

    @staticmethod
    def _check_epoch(t: Topic, group: str | None, partition: int, epoch: int | None) -> bool:
        if group is None or epoch is None:
            return True
        return t.epochs.get((group, partition), epoch) == epoch

    async def get(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_messages: int,
        timeout: float = 0.0,
        group: str | None = None,
        epoch: int | None = None,
        commit: bool = False,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Messages of one partition from ``offset``, waiting up to ``timeout`` for the first.

        With ``commit``, ``group``'s position first moves to ``offset`` (a consumer that
        asks for what follows is done with what precedes: one round trip for both).
        """
        t = self._topic(topic)
        t.last_read = time.monotonic()
        if not self._check_epoch(t, group, partition, epoch):
            return {"revoked": True}
        if commit and group is not None:
            self.commit(topic, partition, group, offset, epoch)
        log = t.logs[partition]
        if log.end <= offset and timeout > 0:
            await wait_for_wake(t.data_waiters[partition], timeout)
            if topic not in self.topics:  # deleted while waiting: nothing more will come
                return {"offset": offset, "messages": [], "end": offset, "deleted": True}
            t.last_read = time.monotonic()
        first, msgs = log.read(offset, max_messages, max_bytes or 2**62)
        return {"offset": first, "messages": msgs, "end": log.end}

    def commit(self, topic: str, partition: int, group: str, offset: int, epoch: int | None = None) -> dict[str, Any]:
        """Commit ``group``'s position in a partition (first offset not yet done)."""
        t = self._topic(topic)
        if not self._check_epoch(t, group, partition, epoch):
            return {"revoked": True}
        log = t.logs[partition]
        before = len(log)
        pos = log.commit(group, offset)
        if len(log) < before:
            Topic.wake(t.room_waiters[partition])
        return {"committed": pos}

    def assign(self, topic: str, partition: int, group: str, epoch: int) -> int:
        """Give ``partition`` to the reader with ``epoch``; return the group's position."""
        t = self._topic(topic)
        t.epochs[(group, partition)] = epoch
        Topic.wake(t.data_waiters[partition])  # revoked long-polls return at once
        return t.logs[partition].subscribe(group)

    def backlog(self, topic: str, group: str) -> int:
        """Messages of ``topic`` that ``group`` has not committed."""
        t = self.topics.get(topic)
        return 0 if t is None else sum(log.lag(group) for log in t.logs)


def install_broker(scheduler: Scheduler) -> BrokerExtension:
    """The broker's extension on ``scheduler`` (once)."""
    ext = scheduler.extensions.get(EXTENSION)
    if ext is None:
        ext = scheduler.extensions[EXTENSION] = BrokerExtension(scheduler)
    return ext


class BrokerPlugin(SchedulerPlugin):
    """Installs :class:`BrokerExtension` on the scheduler (the topics alone; the pipeline controller
    comes with :class:`daskinfer.control.install.ControlPlugin`, which installs this too)."""

    name = PLUGIN_NAME
    idempotent = True

    async def start(self, scheduler: Scheduler) -> None:
        install_broker(scheduler)


async def ensure_broker_async(client: Client) -> None:
    """Install the embedded broker on ``client``'s scheduler (once)."""
    await client.register_plugin(BrokerPlugin())


def ensure_broker(client: Client):
    """Install the embedded broker on ``client``'s scheduler (once)."""
    return client.sync(ensure_broker_async, client)
