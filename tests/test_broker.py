"""The embedded broker on a real scheduler: batched put/get, commits, back-pressure.

Each test has a scheduler of its own (``gen_cluster``, no workers): the broker's state is
the test's to change and to look at (``s.extensions``), and a sweep deletes only its topics.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from distributed.utils_test import async_poll_for, gen_cluster
from timing import scaled

from daskinfer.connectors.base import partition_for
from daskinfer.connectors.embedded import BrokerRPC, TopicSettings, ensure_broker_async
from daskinfer.exceptions import RequestTooLargeError, TopicFullError, TopicNotFoundError


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def start_broker(c) -> BrokerRPC:
    """Install the embedded broker on ``c``'s scheduler; calls to it."""
    await ensure_broker_async(c)
    return BrokerRPC(c.scheduler)


def waiting(s, topic: str, kind: str, partition: int = 0) -> int:
    """How many readers (``kind="data"``) or producers (``"room"``) the broker holds waiting on a partition."""
    return len(getattr(s.extensions["daskinfer-broker"].topics[topic], f"{kind}_waiters")[partition])


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_put_get_commit_round_trip(c, s):
    broker = await start_broker(c)
    name = _topic()
    assert (await broker.create_topic(name, TopicSettings(partitions=3))).partitions == 3
    assert (await broker.create_topic(name, TopicSettings(partitions=5))).partitions == 3, "create is idempotent"
    msgs = [(i % 3, b"m%d" % i) for i in range(3000)]
    assert await broker.put(name, msgs) == 3000
    got = {}
    for p in range(3):
        await broker.assign(name, p, "g", epoch=1)
        reply = await broker.get(name, p, 0, 10_000, group="g", epoch=1)
        got[p] = list(reply["messages"])
        assert reply["offset"] == 0 and reply["end"] == 1000
    for p in range(3):
        assert got[p] == [b"m%d" % i for i in range(p, 3000, 3)], "per-partition order is kept"
    await broker.commit(name, 0, "g", 1000, epoch=1)
    info = await broker.info(name)
    assert list(info["start"]) == [1000, 0, 0] and list(info["end"]) == [1000, 1000, 1000]
    await broker.delete_topic(name)
    with pytest.raises(TopicNotFoundError, match=name):
        await broker.info(name)


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_long_poll_returns_as_soon_as_data_arrives(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1))
    getter = asyncio.ensure_future(broker.get(name, 0, 0, 10, timeout=3600.0))
    await async_poll_for(lambda: waiting(s, name, "data") == 1, timeout=scaled(10))  # the reader waits for data
    await broker.put(name, [(0, b"hello")])
    # the long poll must not wait for its timeout (an hour): it returns with the data
    reply = await asyncio.wait_for(getter, scaled(10))
    assert list(reply["messages"]) == [b"hello"]
    empty = await broker.get(name, 0, 1, 10, timeout=0.05)
    assert list(empty["messages"]) == []


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_full_topic_pushes_back_then_times_out_without_losing_anything(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1, max_messages=100))
    await broker.assign(name, 0, "g", epoch=1)
    await broker.put(name, [(0, b"%d" % i) for i in range(100)])
    with pytest.raises(TopicFullError, match=f"{name}.*partition 0.*100 messages"):
        await broker.put(name, [(0, b"late")], timeout=0.1)
    # a blocked producer proceeds once the consumer commits
    producer = asyncio.ensure_future(broker.put(name, [(0, b"%d" % i) for i in range(100, 150)], timeout=3600))
    await async_poll_for(lambda: waiting(s, name, "room") == 1, timeout=scaled(10))  # the broker holds it
    assert not producer.done(), "the producer must wait for room"
    await broker.commit(name, 0, "g", 60, epoch=1)
    await asyncio.wait_for(producer, scaled(10))
    info = await broker.info(name)
    assert list(info["end"]) == [150] and info["end"][0] - info["start"][0] <= 100
    reply = await broker.get(name, 0, 60, 1000)
    assert list(reply["messages"]) == [b"%d" % i for i in range(60, 150)], "nothing was dropped"


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_stale_epoch_is_revoked(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1))
    await broker.assign(name, 0, "g", epoch=1)
    await broker.put(name, [(0, b"a")])
    await broker.assign(name, 0, "g", epoch=2)
    assert (await broker.get(name, 0, 0, 10, group="g", epoch=1)).get("revoked")
    assert (await broker.commit(name, 0, "g", 1, epoch=1)).get("revoked")
    assert list((await broker.get(name, 0, 0, 10, group="g", epoch=2))["messages"]) == [b"a"]


def test_partition_for_is_stable_and_spreads():
    assert partition_for("user-1", 8) == partition_for("user-1", 8)
    assert len({partition_for(f"k{i}", 8) for i in range(200)}) == 8
    assert partition_for(None, 4, fallback=6) == 2


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_a_fenced_runner_writes_no_results(c, s):
    broker = await start_broker(c)
    inbox, out = _topic(), _topic()
    await broker.create_topic(inbox, TopicSettings(partitions=1))
    await broker.create_topic(out, TopicSettings(partitions=1))
    await broker.assign(inbox, 0, "g", epoch=1)
    await broker.put(inbox, [(0, b"req")])
    await broker.assign(inbox, 0, "g", epoch=2)  # the partition moved on
    commit = {"topic": inbox, "partition": 0, "group": "g", "offset": 1, "epoch": 1}
    reply = await c.scheduler.daskinfer_write(puts=[[out, [[None, b"answer"]]]], commit=commit)
    assert reply["revoked"]
    assert list((await broker.get(out, 0, 0, 10))["messages"]) == [], "no answer from a fenced runner"
    commit["epoch"] = 2
    reply = await c.scheduler.daskinfer_write(puts=[[out, [[None, b"answer"]]]], commit=commit)
    assert not reply.get("revoked")
    assert list((await broker.get(out, 0, 0, 10))["messages"]) == [b"answer"]


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_an_inbox_topic_is_bounded_in_bytes_too(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1, max_messages=1_000_000, max_bytes=10_000))
    await broker.assign(name, 0, "g", epoch=1)
    block = b"x" * 4000
    await broker.put(name, [(0, block), (0, block)])
    with pytest.raises(TopicFullError, match="bytes"):
        await broker.put(name, [(0, block), (0, block)], timeout=0.1)
    info = await broker.info(name)
    assert info["bytes"][0] <= 10_000, "the byte bound holds: producers wait instead"
    await broker.commit(name, 0, "g", info["end"][0], epoch=1)
    await broker.put(name, [(0, block)], timeout=1)  # room again


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_a_message_over_the_topic_limit_is_refused(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1, max_message_size=1000))
    with pytest.raises(RequestTooLargeError, match="1001 bytes is over the limit of 1000"):
        await broker.put(name, [(0, b"x" * 1001)])


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_a_retained_topic_drops_oldest_and_never_blocks(c, s):
    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1, max_messages=10, retain=True))
    for i in range(5):  # nobody reads it: writes go on, the oldest go, counted
        await broker.put(name, [(0, b"%d" % j) for j in range(i * 10, i * 10 + 10)], timeout=0.1)
    info = await broker.info(name)
    assert info["dropped"] == 40
    assert list((await broker.get(name, 0, 0, 100))["messages"]) == [b"%d" % j for j in range(40, 50)]


@gen_cluster(client=True, nthreads=[], timeout=scaled(30))
async def test_a_reply_topic_nobody_reads_expires(c, s):
    def sweep(dask_scheduler=None):
        import time

        return dask_scheduler.extensions["daskinfer-broker"].sweep(time.monotonic() + 3600)

    broker = await start_broker(c)
    name = _topic()
    await broker.create_topic(name, TopicSettings(partitions=1, retain=True, ttl=60.0))
    await broker.put(name, [(0, b"r")])
    assert name in await c.run_on_scheduler(sweep)
    with pytest.raises(TopicNotFoundError):
        await broker.info(name)
