"""The embedded broker on a real scheduler: batched put/get, commits, back-pressure."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from daskinfer.connectors.base import partition_for
from daskinfer.connectors.embedded import BrokerRPC, TopicSettings, ensure_broker_async
from daskinfer.exceptions import RequestTooLargeError, TopicFullError, TopicNotFoundError


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def broker(client):
    client.sync(ensure_broker_async, client)
    return BrokerRPC(client.scheduler)


def test_put_get_commit_round_trip(client, broker):
    async def run():
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

    client.sync(run)


def test_long_poll_returns_as_soon_as_data_arrives(client, broker):
    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        getter = asyncio.ensure_future(broker.get(name, 0, 0, 10, timeout=5.0))
        await asyncio.sleep(0.05)
        await broker.put(name, [(0, b"hello")])
        reply = await asyncio.wait_for(getter, 5)
        assert list(reply["messages"]) == [b"hello"]
        assert loop.time() - t0 < 2.0, "the long poll must not wait for its timeout"
        empty = await broker.get(name, 0, 1, 10, timeout=0.05)
        assert list(empty["messages"]) == []

    client.sync(run)


def test_full_topic_pushes_back_then_times_out_without_losing_anything(client, broker):
    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1, max_messages=100))
        await broker.assign(name, 0, "g", epoch=1)
        await broker.put(name, [(0, b"%d" % i) for i in range(100)])
        with pytest.raises(TopicFullError, match=f"{name}.*partition 0.*100 messages"):
            await broker.put(name, [(0, b"late")], timeout=0.1)
        # a blocked producer proceeds once the consumer commits
        producer = asyncio.ensure_future(broker.put(name, [(0, b"%d" % i) for i in range(100, 150)], timeout=10))
        await asyncio.sleep(0.05)
        assert not producer.done(), "the producer must wait for room"
        await broker.commit(name, 0, "g", 60, epoch=1)
        await asyncio.wait_for(producer, 10)
        info = await broker.info(name)
        assert list(info["end"]) == [150] and info["end"][0] - info["start"][0] <= 100
        reply = await broker.get(name, 0, 60, 1000)
        assert list(reply["messages"]) == [b"%d" % i for i in range(60, 150)], "nothing was dropped"

    client.sync(run)


def test_stale_epoch_is_revoked(client, broker):
    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1))
        await broker.assign(name, 0, "g", epoch=1)
        await broker.put(name, [(0, b"a")])
        await broker.assign(name, 0, "g", epoch=2)
        assert (await broker.get(name, 0, 0, 10, group="g", epoch=1)).get("revoked")
        assert (await broker.commit(name, 0, "g", 1, epoch=1)).get("revoked")
        assert list((await broker.get(name, 0, 0, 10, group="g", epoch=2))["messages"]) == [b"a"]

    client.sync(run)


def test_partition_for_is_stable_and_spreads():
    assert partition_for("user-1", 8) == partition_for("user-1", 8)
    assert len({partition_for(f"k{i}", 8) for i in range(200)}) == 8
    assert partition_for(None, 4, fallback=6) == 2


def test_a_fenced_runner_writes_no_results(client, broker):
    async def run():
        inbox, out = _topic(), _topic()
        await broker.create_topic(inbox, TopicSettings(partitions=1))
        await broker.create_topic(out, TopicSettings(partitions=1))
        await broker.assign(inbox, 0, "g", epoch=1)
        await broker.put(inbox, [(0, b"req")])
        await broker.assign(inbox, 0, "g", epoch=2)  # the partition moved on
        commit = {"topic": inbox, "partition": 0, "group": "g", "offset": 1, "epoch": 1}
        reply = await client.scheduler.daskinfer_write(puts=[[out, [[None, b"answer"]]]], commit=commit)
        assert reply["revoked"]
        assert list((await broker.get(out, 0, 0, 10))["messages"]) == [], "no answer from a fenced runner"
        commit["epoch"] = 2
        reply = await client.scheduler.daskinfer_write(puts=[[out, [[None, b"answer"]]]], commit=commit)
        assert not reply.get("revoked")
        assert list((await broker.get(out, 0, 0, 10))["messages"]) == [b"answer"]

    client.sync(run)


def test_an_inbox_topic_is_bounded_in_bytes_too(client, broker):
    async def run():
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

    client.sync(run)


def test_a_message_over_the_topic_limit_is_refused(client, broker):
    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1, max_message_size=1000))
        with pytest.raises(RequestTooLargeError, match="1001 bytes is over the limit of 1000"):
            await broker.put(name, [(0, b"x" * 1001)])

    client.sync(run)


def test_a_retained_topic_drops_oldest_and_never_blocks(client, broker):
    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1, max_messages=10, retain=True))
        for i in range(5):  # nobody reads it: writes go on, the oldest go, counted
            await broker.put(name, [(0, b"%d" % j) for j in range(i * 10, i * 10 + 10)], timeout=0.1)
        info = await broker.info(name)
        assert info["dropped"] == 40
        assert list((await broker.get(name, 0, 0, 100))["messages"]) == [b"%d" % j for j in range(40, 50)]

    client.sync(run)


def test_a_reply_topic_nobody_reads_expires(client, broker):
    def sweep(dask_scheduler=None):
        import time

        return dask_scheduler.extensions["daskinfer-broker"].sweep(time.monotonic() + 3600)

    async def run():
        name = _topic()
        await broker.create_topic(name, TopicSettings(partitions=1, retain=True, ttl=60.0))
        await broker.put(name, [(0, b"r")])
        return name

    name = client.sync(run)
    assert name in client.run_on_scheduler(sweep)
    with pytest.raises(TopicNotFoundError):
        client.sync(broker.info, name)
