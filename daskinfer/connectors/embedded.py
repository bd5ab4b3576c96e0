"""The embedded broker: topics with partitions hosted by the Dask scheduler.

It needs nothing but the Dask cluster (the analog of Jet's distributed topic).
Every call moves many messages (batched RPCs on the scheduler's comm), consumers
read by offset and commit per group, and a full partition pushes back on its
producers (they wait for room up to ``broker.put-timeout``, then get
:class:`~daskinfer.exceptions.TopicFullError`); nothing is dropped silently.
State lives in the scheduler, so it survives any worker's death.

Install it with :func:`ensure_broker` (done by :class:`~daskinfer.InferenceClient`
and :func:`~daskinfer.deploy_pipeline`).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from daskinfer import settings
from daskinfer.connectors.base import ClientTransport, Connector, Envelope, PartitionRevoked
from daskinfer.connectors.log import PartitionLog
from daskinfer.exceptions import ConfigError, TopicFullError, TopicNotFoundError

if TYPE_CHECKING:
    from distributed import Client, Scheduler

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskinfer-broker"


def partition_for(key: str | None, n_partitions: int, fallback: int = 0) -> int:
    """Partition of a key (stable across processes); ``fallback`` when there is no key."""
    if key is None:
        return fallback % n_partitions
    return zlib.crc32(key.encode()) % n_partitions


async def _wait(waiters: list[asyncio.Future], timeout: float) -> None:
    """Wait until woken (see ``Topic._wake``) or ``timeout`` s, leaving no stale waiter."""
    fut = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        try:
            waiters.remove(fut)
        except ValueError:
            pass


class Topic:
    def __init__(self, name: str, partitions: int, max_messages: int):
        self.name = name
        self.logs = [PartitionLog(max_messages) for _ in range(partitions)]
        self.data_waiters: list[list[asyncio.Future]] = [[] for _ in range(partitions)]
        self.room_waiters: list[list[asyncio.Future]] = [[] for _ in range(partitions)]
        # partition -> (owner group, epoch): readers/committers with another epoch are revoked
        self.epochs: dict[tuple[str, int], int] = {}

    @staticmethod
    def _wake(waiters: list[asyncio.Future]) -> None:
        for f in waiters:
            if not f.done():
                f.set_result(None)
        waiters.clear()


class BrokerExtension:
    """Scheduler-side state and RPC handlers of the embedded broker."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.topics: dict[str, Topic] = {}
        scheduler.handlers.update(
            {
                "daskinfer_topic_create": self.create_topic,
                "daskinfer_topic_delete": self.delete_topic,
                "daskinfer_topic_info": self.topic_info,
                "daskinfer_put": self.put,
                "daskinfer_write": self.write,
                "daskinfer_get": self.get,
                "daskinfer_commit": self.commit,
                "daskinfer_assign": self.assign,
            }
        )

    def _topic(self, name: str) -> Topic:
        try:
            return self.topics[name]
        except KeyError:
            raise TopicNotFoundError(f"topic {name!r} does not exist; topics: {sorted(self.topics)}") from None

    def create_topic(self, name: str, partitions: int | None = None, max_messages: int | None = None) -> int:
        """Create a topic (no-op if it exists); return its number of partitions."""
        if name in self.topics:
            return len(self.topics[name].logs)
        n = int(settings.get("broker.partitions", partitions))
        cap = int(settings.get("broker.max-messages", max_messages))
        if n < 1 or cap < 1:
            raise ConfigError(f"topic {name!r}: partitions and max_messages must be >= 1, got {n} and {cap}")
        self.topics[name] = Topic(name, n, cap)
        return n

    def delete_topic(self, name: str) -> None:
        topic = self.topics.pop(name, None)
        if topic:
            for ws in topic.data_waiters + topic.room_waiters:
                Topic._wake(ws)

    def topic_info(self, name: str) -> dict[str, Any]:
        t = self._topic(name)
        return {
            "partitions": len(t.logs),
            "start": [log.start for log in t.logs],
            "end": [log.end for log in t.logs],
            "committed": [dict(log.committed) for log in t.logs],
            "max_messages": t.logs[0].max_messages,
        }

    async def put(self, topic: str, messages: list, timeout: float | None = None) -> int:
        """Append ``[[partition, data], ...]``; wait for room; return how many were appended."""
        t = self._topic(topic)
        timeout = settings.get_seconds("broker.put-timeout", timeout)
        by_part: dict[int, list[bytes]] = {}
        n_parts = len(t.logs)
        for p, data in messages:
            by_part.setdefault(p % n_parts, []).append(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for p, datas in by_part.items():
            log = t.logs[p]
            i = 0
            while i < len(datas):
                room = log.room()
                if room:
                    log.append(datas[i : i + room])
                    i += room
                    Topic._wake(t.data_waiters[p])
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    raise TopicFullError(
                        f"topic {topic!r} partition {p} stayed full ({log.max_messages} messages) for "
                        f"{timeout:g}s; {i} of {len(datas)} messages for it were appended"
                    )
                await _wait(t.room_waiters[p], left)
                if topic not in self.topics:
                    raise TopicNotFoundError(f"topic {topic!r} was deleted")
        return len(messages)

    async def write(self, puts: list, fallback: int = 0, commit: dict | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """A runner's output in one call: append ``[[topic, [[key, data], ...]], ...]`` (keys pick
        partitions), then commit ``commit`` (topic, partition, group, offset, epoch).

        A runner whose epoch was superseded writes nothing (``revoked``): the new owner
        redoes its uncommitted requests, and their answers must not appear twice.

        Topics that no longer exist (a client that left) are skipped and named in ``missing``.
        """
        missing = []
        if commit is not None and not self._fresh(commit):
            return {"missing": missing, "revoked": True}  # a fenced runner writes nothing
        for topic, rows in puts:
            if commit is not None and not self._fresh(commit):  # reassigned while we waited for room
                return {"missing": missing, "revoked": True}
            t = self.topics.get(topic)
            if t is None:
                missing.append(topic)
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

    def _check_epoch(self, t: Topic, group: str | None, partition: int, epoch: int | None) -> bool:
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
    ) -> dict[str, Any]:
        """Messages of one partition from ``offset``, waiting up to ``timeout`` for the first.

        With ``commit``, ``group``'s position first moves to ``offset`` (a consumer that
        asks for what follows is done with what precedes: one round trip for both).
        """
        t = self._topic(topic)
        if not self._check_epoch(t, group, partition, epoch):
            return {"revoked": True}
        if commit and group is not None:
            self.commit(topic, partition, group, offset, epoch)
        log = t.logs[partition]
        if log.end <= offset and timeout > 0:
            await _wait(t.data_waiters[partition], timeout)
            if topic not in self.topics:  # deleted while waiting: nothing more will come
                return {"offset": offset, "messages": [], "end": offset, "deleted": True}
        first, msgs = log.read(offset, max_messages)
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
            Topic._wake(t.room_waiters[partition])
        return {"committed": pos}

    def assign(self, topic: str, partition: int, group: str, epoch: int) -> int:
        """Give ``partition`` to the reader with ``epoch``; return the group's position."""
        t = self._topic(topic)
        t.epochs[(group, partition)] = epoch
        Topic._wake(t.data_waiters[partition])  # revoked long-polls return at once
        return t.logs[partition].subscribe(group)

    def subscribe(self, topic: str, group: str) -> None:
        for log in self._topic(topic).logs:
            log.subscribe(group)


class BrokerPlugin(SchedulerPlugin):
    """Installs :class:`BrokerExtension` (and the pipeline controller) on the scheduler."""

    name = PLUGIN_NAME
    idempotent = True

    async def start(self, scheduler: Scheduler) -> None:
        from daskinfer.control.controller import ControllerExtension

        if "daskinfer-broker" not in scheduler.extensions:
            scheduler.extensions["daskinfer-broker"] = BrokerExtension(scheduler)
            scheduler.extensions["daskinfer-controller"] = ControllerExtension(scheduler)
            scheduler.add_plugin(scheduler.extensions["daskinfer-controller"].events, name="daskinfer-controller-events")


async def _ensure_broker(client: Client) -> None:
    await client._register_scheduler_plugin(BrokerPlugin(), name=PLUGIN_NAME, idempotent=True)


def ensure_broker(client: Client):
    """Install the embedded broker on ``client``'s scheduler (once)."""
    return client.sync(_ensure_broker, client)


class BrokerRPC:
    """Async calls to the embedded broker through a scheduler rpc (``client.scheduler``, ``worker.scheduler``)."""

    def __init__(self, rpc: Any):
        self.rpc = rpc
        self._partitions: dict[str, int] = {}

    async def create_topic(self, name: str, partitions: int | None = None, max_messages: int | None = None) -> int:
        n = await self.rpc.daskinfer_topic_create(name=name, partitions=partitions, max_messages=max_messages)
        self._partitions[name] = n
        return n

    async def partitions(self, topic: str) -> int:
        if topic not in self._partitions:
            self._partitions[topic] = (await self.rpc.daskinfer_topic_info(name=topic))["partitions"]
        return self._partitions[topic]

    async def info(self, topic: str) -> dict[str, Any]:
        return await self.rpc.daskinfer_topic_info(name=topic)

    async def delete_topic(self, name: str) -> None:
        self._partitions.pop(name, None)
        await self.rpc.daskinfer_topic_delete(name=name)

    async def put(self, topic: str, messages: list[tuple[int, bytes]], timeout: float | None = None) -> int:
        return await self.rpc.daskinfer_put(topic=topic, messages=messages, timeout=timeout)

    async def get(self, topic: str, partition: int, offset: int, max_messages: int, timeout: float = 0.0,
                  group: str | None = None, epoch: int | None = None, commit: bool = False) -> dict[str, Any]:
        return await self.rpc.daskinfer_get(topic=topic, partition=partition, offset=offset,
                                            max_messages=max_messages, timeout=timeout, group=group, epoch=epoch,
                                            commit=commit)

    async def commit(self, topic: str, partition: int, group: str, offset: int, epoch: int | None = None) -> dict:
        return await self.rpc.daskinfer_commit(topic=topic, partition=partition, group=group, offset=offset, epoch=epoch)

    async def assign(self, topic: str, partition: int, group: str, epoch: int) -> int:
        return await self.rpc.daskinfer_assign(topic=topic, partition=partition, group=group, epoch=epoch)


class EmbeddedConnector(Connector):
    """A partition runner's view of the embedded broker: one inbox partition, read by offset."""

    def __init__(self, rpc: Any, inbox: str, partition: int, group: str, epoch: int, outbox_partitions: dict[str, int] | None = None):
        self.broker = BrokerRPC(rpc)
        self.inbox = inbox
        self.partition = partition
        self.group = group
        self.epoch = epoch
        self.position = 0
        self._done: set[int] = set()
        self._committed = 0
        self.dropped = 0

    async def start(self) -> None:
        self.position = await self.broker.assign(self.inbox, self.partition, self.group, self.epoch)
        self._committed = self.position

    async def read(self, max_messages: int, timeout: float) -> list[Envelope]:
        reply = await self.broker.get(self.inbox, self.partition, self.position, max_messages, timeout,
                                      group=self.group, epoch=self.epoch)
        if reply.get("revoked"):
            raise PartitionRevoked(f"partition {self.partition} of {self.inbox!r} moved to another runner")
        first = reply["offset"]
        if first > self.position:  # messages below were dropped by retention (cannot happen while subscribed)
            logger.warning("partition %d of %r skipped offsets %d..%d", self.partition, self.inbox, self.position, first)
            self._committed = max(self._committed, first)
        msgs = reply["messages"]
        p = self.partition
        out = [Envelope(p, first + i, m) for i, m in enumerate(msgs)]
        self.position = first + len(msgs)
        return out

    def _advance(self, envelopes: list[Envelope]) -> int | None:
        """Mark envelopes done; return the new commit position if it moved."""
        done = self._done
        done.update(e.offset for e in envelopes)
        c = self._committed
        while c in done:
            done.discard(c)
            c += 1
        if c == self._committed:
            return None
        self._committed = c
        return c

    async def write_and_commit(self, items: list[tuple[str, str | None, bytes]], envelopes: list[Envelope]) -> None:
        by_topic: dict[str, list[tuple[str | None, bytes]]] = {}
        for topic, key, data in items:
            by_topic.setdefault(topic, []).append((key, data))
        pos = self._advance(envelopes)
        commit = None if pos is None else {
            "topic": self.inbox, "partition": self.partition, "group": self.group, "offset": pos, "epoch": self.epoch,
        }
        reply = await self.broker.rpc.daskinfer_write(puts=list(by_topic.items()), fallback=self.partition, commit=commit)
        if reply["missing"]:
            self.dropped += sum(len(by_topic[t]) for t in reply["missing"])
            logger.warning("results for topics %s dropped: the topics are gone (clients that left)", reply["missing"])
        if reply.get("revoked"):
            raise PartitionRevoked(f"partition {self.partition} of {self.inbox!r} moved to another runner")

    async def write(self, items: list[tuple[str, str | None, bytes]]) -> None:
        await self.write_and_commit(items, [])

    async def commit(self, envelopes: list[Envelope]) -> None:
        await self.write_and_commit([], envelopes)

    def describe(self) -> dict[str, Any]:
        return {"position": self.position, "committed": self._committed, "dropped": self.dropped}


class EmbeddedTransport(ClientTransport):
    """The client side of the embedded broker: put into the inbox, read a reply topic."""

    def __init__(self, client: Client, read_batch: int = 8192):
        self.client = client
        self.broker = BrokerRPC(client.scheduler)
        self.read_batch = read_batch
        self.reply_topic: str | None = None
        self._offset = 0

    async def start(self, inbox: str, reply_topic: str) -> int:
        await _ensure_broker(self.client)
        n = await self.broker.create_topic(inbox)
        await self.broker.create_topic(reply_topic, partitions=1)
        await self.broker.assign(reply_topic, 0, "client", 1)
        self.reply_topic = reply_topic
        return n

    async def send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        await self.broker.put(inbox, items)

    async def receive(self, timeout: float) -> list[bytes]:
        assert self.reply_topic is not None
        # the read commits what the previous one returned (delivered by then)
        reply = await self.broker.get(self.reply_topic, 0, self._offset, self.read_batch, timeout=timeout,
                                      group="client", epoch=1, commit=True)
        msgs = reply["messages"]
        self._offset = reply["offset"] + len(msgs)
        return msgs

    async def close(self) -> None:
        if self.reply_topic is not None:
            await self.broker.delete_topic(self.reply_topic)
