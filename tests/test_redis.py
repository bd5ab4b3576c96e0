"""Redis Streams connector end to end: a real ``redis-server`` on loopback and the session LocalCluster."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

import dask
import numpy as np
import pytest

if os.environ.get("CI"):
    import redis  # CI must run these tests: a missing extra is an error there, not a skip
else:
    redis = pytest.importorskip("redis", reason="the redis extra is not installed (pip install daskinfer[redis])")

from redis_server import redis_server, redis_url  # noqa: E402,F401  (fixtures)
from timing import scaled  # noqa: E402

import daskinfer  # noqa: E402
from daskinfer import InferenceClient, OnnxModel, Pipeline, PythonModel, deploy, deploy_pipeline, undeploy  # noqa: E402
from daskinfer.connectors.base import Messages, OutMessage, PartitionRevoked  # noqa: E402
from daskinfer.connectors.redis import (  # noqa: E402
    RedisConnector,
    RedisTransport,
    inbox_stream,
    prepare_streams,
)
from daskinfer.testing import check_rows_and_blocks, collect_results, random_rows, run_onnx_directly  # noqa: E402
from daskinfer.wire import codec
from daskinfer.wire.frames import peek_fields  # noqa: E402
from daskinfer.wire.messages import Request

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def mlp(client, mlp_path):
    deploy(client, OnnxModel("mlp-redis", mlp_path))
    yield "mlp-redis"
    undeploy(client, "mlp-redis")


@pytest.fixture
def r(redis_url):
    """A plain synchronous Redis client to look inside the streams."""
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def _inbox() -> str:
    return f"in-{uuid.uuid4().hex[:8]}"


def _pipeline(url: str, inbox: str, model: str, **kw) -> Pipeline:
    kw.setdefault("dead_letter", f"dead-{inbox}")
    return Pipeline(
        model=model, inbox=inbox, outbox=f"out-{inbox}", connector="redis", connector_options={"url": url}, **kw
    )


def _drain(ic: InferenceClient, answered: dict, limit: int = 100) -> None:
    """Move up to ``limit`` arrived results into ``answered`` (so a poll sees progress while work is pending)."""
    for n, res in enumerate(ic.results(timeout=0.01), 1):
        assert res.id not in answered, "delivered twice"
        answered[res.id] = res
        if n >= limit:
            return


def _spec(url: str, inbox: str, partitions: int = 1) -> dict:
    return _pipeline(url, inbox, "m", partitions=partitions).resolve().to_plain()


def _part(msgs: Messages, sl: slice) -> Messages:
    """Some of a read's messages (to acknowledge part of a read)."""
    return Messages(msgs.payloads[sl], msgs.positions[sl])


def _out(topic: str, data: bytes, key: str | None = None) -> OutMessage:
    return OutMessage(topic, key, data)


# -- no cluster needed ------------------------------------------------------------------------------


def test_fencing_a_newer_runner_revokes_the_older_and_takes_its_pending_entries(redis_url, r):
    inbox = _inbox()

    async def run():
        spec = _spec(redis_url, inbox)
        await prepare_streams(spec)
        old = RedisConnector(spec, 0, epoch=1)
        await old.start()
        for i in range(5):
            r.xadd(inbox_stream(inbox, 0), {"d": f"m{i}".encode()})
        got = await old.read(3, 1.0)
        assert got.payloads == [b"m0", b"m1", b"m2"]
        await old.write_and_commit([], [_part(got, slice(0, 1))])  # m0 done; m1, m2 read but not acknowledged

        new = RedisConnector(spec, 0, epoch=2)
        await new.start()
        assert new.claimed == 2
        with pytest.raises(PartitionRevoked, match="moved to a newer runner"):
            await old.read(10, 0.1)
        with pytest.raises(PartitionRevoked):
            await old.write_and_commit([], [_part(got, slice(1, None))])
        first = await new.read(10, 1.0)  # the taken-over entries come first
        assert first.payloads == [b"m1", b"m2"]
        rest = await new.read(10, 1.0)
        assert rest.payloads == [b"m3", b"m4"]
        await new.write_and_commit([], [first, rest])
        r.xadd(inbox_stream(inbox, 0), {"d": b"m5"})  # what the runner reads next is this: nothing was left
        last = await new.read(10, scaled(10))
        assert last.payloads == [b"m5"]
        await new.write_and_commit([], [last])
        assert r.xlen(inbox_stream(inbox, 0)) == 0, "acknowledged entries are deleted"
        assert r.xpending(inbox_stream(inbox, 0), spec["name"])["pending"] == 0
        # a runner of an older deployment cannot take the partition back
        stale = RedisConnector(dict(spec, redis_generation=spec["redis_generation"] - 1), 0, epoch=99)
        with pytest.raises(PartitionRevoked):
            await stale.start()
        for c in (old, new, stale):
            await c.close()

    asyncio.run(run())


def test_results_for_a_closed_client_are_dropped_and_results_and_acks_go_together(redis_url, r):
    inbox = _inbox()

    async def run():
        spec = _spec(redis_url, inbox)
        await prepare_streams(spec)
        c = RedisConnector(spec, 0, epoch=1)
        await c.start()
        stream = inbox_stream(inbox, 0)
        for i in range(3):
            r.xadd(stream, {"d": f"m{i}".encode()})
        envs = await c.read(10, 1.0)
        big = b"x" * 100_000  # over 8 KiB: passed apart from the small ones
        await c.write_and_commit(
            [_out(spec["outbox"], b"r0"), _out(f"gone-{inbox}", b"r1"), _out(spec["outbox"], big, "k")],
            [_part(envs, slice(0, 2))],
        )
        assert [f[b"d"] for _, f in r.xrange(spec["outbox"])] == [b"r0", big]
        assert not r.exists(f"gone-{inbox}"), "a reply stream is never created by a result"
        assert c.describe()["dropped"] == 1
        assert [f[b"d"] for _, f in r.xrange(stream)] == [b"m2"], "exactly the written ones are deleted"
        assert r.xpending(stream, spec["name"])["pending"] == 1
        await c.close()

    asyncio.run(run())


def test_a_repeated_delivery_writes_nothing_twice(redis_url, r):
    """The deliver call retried after a lost reply (it had run): the outbox stays idempotent."""
    inbox = _inbox()

    async def run():
        spec = _spec(redis_url, inbox)
        await prepare_streams(spec)
        c = RedisConnector(spec, 0, epoch=1)
        await c.start()
        for i in range(4):
            r.xadd(inbox_stream(inbox, 0), {"d": f"m{i}".encode()})
        envs = await c.read(10, 1.0)
        results = [_out(spec["outbox"], b"r%d" % i) for i in range(4)]
        await c.write_and_commit(results, [envs])
        await c.write_and_commit(results, [envs])  # the same call again
        assert [f[b"d"] for _, f in r.xrange(spec["outbox"])] == [b"r0", b"r1", b"r2", b"r3"]
        assert r.xlen(inbox_stream(inbox, 0)) == 0
        await c.close()

    asyncio.run(run())


def test_send_waits_at_the_bound_and_fails_clearly_when_nobody_consumes(redis_url, r):
    """Sends do not wait for each other (a window of them in flight), so a send that finds no room
    within put_timeout answers its own requests with a TopicFullError result naming the stream."""
    from daskinfer.wire.result_frames import decode_results

    inbox = _inbox()

    async def run():
        t = RedisTransport(redis_url, partitions=2, max_stream_length=10, put_timeout=0.3)
        assert await t.start(inbox, f"reply-{inbox}") == 2
        await t.send(inbox, [(0, b"x")] * 10)
        await t.send(inbox, [(0, Request(f"late-{i}", {"x": np.zeros(2, np.float32)}).encode()) for i in range(3)])
        t0 = time.monotonic()
        answers = []
        while len(answers) < 3 and time.monotonic() - t0 < 30:
            answers += [res for data in await t.receive(0.5) for res in decode_results(data).results()]
        assert time.monotonic() - t0 >= 0.25, "a send waits put_timeout for room before it gives up"
        assert sorted(a.id for a in answers) == ["late-0", "late-1", "late-2"]
        for a in answers:
            assert a.error_type == "TopicFullError"
            assert "stayed at its bound of 10 entries" in a.error and "0 of 3 requests" in a.error, a.error
        assert r.xlen(inbox_stream(inbox, 0)) == 10, "nothing trimmed, nothing beyond the bound"
        assert t.refused == 3
        await t.close()
        assert not r.exists(f"reply-{inbox}")

    asyncio.run(run())


def test_sends_in_flight_land_in_the_order_they_were_made(redis_url, r):
    """Several sends to one partition in flight at once (a window of 8), over several connections:
    the stream holds them in the order they were made, each message once."""
    inbox = _inbox()

    async def run():
        t = RedisTransport(redis_url, partitions=1, send_window=8)
        await t.start(inbox, f"reply-{inbox}")
        for i in range(400):
            await t.send(inbox, [(0, f"m{i:04d}".encode())])
        while t.in_flight:
            await asyncio.sleep(0.01)
        peak = t.peak_in_flight
        await t.close()
        return peak

    peak = asyncio.run(run())
    entries = [fields[b"d"] for _, fields in r.xrange(inbox_stream(inbox, 0))]
    assert entries == [f"m{i:04d}".encode() for i in range(400)], "sends landed out of the order they were made"
    assert peak > 1, f"sends did not overlap (at most {peak} in flight)"


def test_password_in_the_url_and_a_clear_error_without_it(tmp_path):
    from redis_server import RedisServer

    from daskinfer.exceptions import BrokerError

    server = RedisServer(str(tmp_path), appendonly=False, password="s3cret")
    server.start()
    try:
        inbox = _inbox()

        async def run():
            spec = _spec(server.url, inbox, partitions=2)
            await prepare_streams(spec)
            t = RedisTransport(server.url)
            assert await t.start(inbox, f"reply-{inbox}") == 2
            await t.send(inbox, [(1, b"hello")])
            await t.close()
            bad = RedisTransport(server.url.replace("s3cret", "wrong"))  # fails at once, without reconnecting
            with pytest.raises(BrokerError, match="refused the credentials") as info:
                await bad.start(inbox, f"reply2-{inbox}")
            assert "wrong" not in str(info.value) and "s3cret" not in str(info.value)
            await bad.close()

        asyncio.run(run())
        with redis.Redis.from_url(server.url) as conn:
            assert conn.xrange(inbox_stream(inbox, 1))[0][1] == {b"d": b"hello"}
    finally:
        server.stop()


def test_rediss_urls_use_tls_and_urls_in_errors_hide_the_password():
    from redis.asyncio.connection import SSLConnection

    from daskinfer.connectors.redis.link import RedisLink, redact_url

    async def run():
        link = RedisLink("rediss://:pw@example.invalid:6380/1", {"ssl_ca_certs": "/nonexistent/ca.pem"}, "test")
        assert issubclass(link.redis.connection_pool.connection_class, SSLConnection)
        assert link.redis.connection_pool.connection_kwargs["ssl_ca_certs"] == "/nonexistent/ca.pem"
        await link.aclose()

    asyncio.run(run())
    assert redact_url("rediss://user:pw@host:6380/1") == "rediss://***@host:6380/1"


# -- end to end on the session cluster --------------------------------------------------------------


def test_outputs_equal_onnxruntime_rows_and_blocks_key_order_each_answered_once(
    client, mlp, mlp_path, redis_url, r, poll
):
    inbox = _inbox()
    handle = deploy_pipeline(client, _pipeline(redis_url, inbox, mlp, partitions=3, max_batch_size=2048))
    try:
        with InferenceClient(client, inbox=inbox, transport=RedisTransport(redis_url)) as ic:
            n = 3000
            # single rows and blocks (some of 2000 rows: 128 KiB each way, over Redis's 8 KiB small-message size)
            check_rows_and_blocks(ic, n, mlp_path)
            poll(lambda: r.xlen(ic.reply_target) == 0, what="the client deleting what it received")
        assert not r.exists(ic.reply_target), "closing the client deletes its reply stream"
        # (a runner counts its answers once their write returns: the client may have them a moment before)
        poll(
            lambda: sum(x["answered"] for x in handle.status()["runners"]) == n + 2,
            what="the runners counting every answer written",
        )
        assert sum(r.xlen(inbox_stream(inbox, p)) for p in range(3)) == 0, "processed entries are deleted"
    finally:
        handle.stop()


def test_garbage_in_an_inbox_stream_goes_to_dead_letters_and_the_rest_are_answered(
    client, mlp, mlp_path, redis_url, r, poll
):
    inbox = _inbox()
    handle = deploy_pipeline(client, _pipeline(redis_url, inbox, mlp, partitions=2))
    try:
        with InferenceClient(client, inbox=inbox, transport=RedisTransport(redis_url)) as ic:
            rows = random_rows(200, seed=3)
            futures = [ic.submit(row, key=f"k{i % 5}") for i, row in enumerate(rows[:100])]
            r.xadd(inbox_stream(inbox, 0), {"d": b"\xc1garbage"})
            r.xadd(inbox_stream(inbox, 1), {"other": b"no d field"})
            futures += [ic.submit(row, key=f"k{i % 5}") for i, row in enumerate(rows[100:])]
            got = np.stack([f.result(30).value() for f in futures])
        np.testing.assert_allclose(got, run_onnx_directly(mlp_path, {"x": rows})["probabilities"], rtol=1e-5, atol=1e-6)
        dead = f"dead-{inbox}"
        letters = []

        def two_letters():
            letters[:] = [codec.decode(f[b"d"]) for _, f in r.xrange(dead) if f.get(b"d")]
            return len(letters) >= 2

        poll(two_letters, what="two dead letters")
        assert sorted(d["data"] for d in letters) == [b"", b"\xc1garbage"]
        assert {d["error_type"] for d in letters} == {"CodecError"}
    finally:
        handle.stop()


def _slow_model(name: str, client, delay: float = 0.002):
    def slow(x):
        time.sleep(delay)
        return x * 2

    deploy(client, PythonModel(name, slow))
    return name


def test_entries_are_acked_only_after_their_results_and_redone_after_a_hard_stop(client, redis_url, r, poll):
    model = _slow_model("slow-redis-ack", client, delay=0.01)
    inbox = _inbox()
    spec = _pipeline(redis_url, inbox, model, partitions=1, max_batch_size=10, max_inflight=1)
    handle = deploy_pipeline(client, spec)
    stream = inbox_stream(inbox, 0)
    try:
        # frames of at most 10 requests: many stream entries, so a hard stop finds some read and not acknowledged
        with dask.config.set({"daskinfer.client.max-frame-requests": 10}):
            ic = InferenceClient(client, inbox=inbox, transport=RedisTransport(redis_url))
        with ic:
            n = 600
            rows = np.arange(n, dtype=np.float32)[:, None]
            ids = [ic.send(rows[i], key="one") for i in range(n)]
            answered: dict[str, daskinfer.Result] = {}

            def drain() -> None:
                _drain(ic, answered)

            poll(lambda: drain() or len(answered) >= 100, timeout=30, what="the first answers")
            handle.stop(drain=False)  # mid-stream: entries are read and pending, some in the model
            pending = r.xpending(stream, handle.name)["pending"]
            assert pending > 0, "the runner had read entries that it had not acknowledged"
            in_stream = {i for _, f in r.xrange(stream) for i in peek_fields(f[b"d"])["ids"]}
            # nothing was acknowledged without its answer written: every request is answered or still there
            poll(
                lambda: drain() or set(ids) <= set(answered) | in_stream,
                what="answers of all acknowledged entries",
            )
            assert len(answered) < n
            first_round = len(answered)

            handle = deploy_pipeline(client, spec)  # same group: the new runner claims the pending entries
            poll(lambda: drain() or len(answered) >= n, timeout=60, what="all answers after the restart")
            st = handle.status()
            assert sum(x["claimed"] for x in st["runners"]) == pending
            assert sorted(answered) == sorted(ids), "each request answered exactly once"
            np.testing.assert_allclose(np.stack([answered[i].value() for i in ids]), rows * 2)
            assert ic.received == n and first_round < n
            assert r.xlen(stream) == 0 and r.xpending(stream, handle.name)["pending"] == 0
    finally:
        handle.stop()
        undeploy(client, model)


def test_redis_restart_mid_stream_loses_and_repeats_no_answer(client, mlp, mlp_path, redis_server, redis_url, r, poll):
    inbox = _inbox()
    handle = deploy_pipeline(client, _pipeline(redis_url, inbox, mlp, partitions=2, max_batch_size=64))
    try:
        with InferenceClient(client, inbox=inbox, transport=RedisTransport(redis_url)) as ic:
            rows = random_rows(4000, seed=5)
            answered: dict[str, daskinfer.Result] = {}

            def drain() -> None:
                _drain(ic, answered)

            sent: dict[str, int] = {}  # request id -> row
            restarted = threading.Event()
            around: list[int] = []

            def produce() -> None:  # a steady, paced stream of requests that goes on across the restart
                i = 0
                while i < 20_000:
                    sent[ic.send(rows[i % len(rows)], key=f"k{i % 3}")] = i % len(rows)
                    i += 1
                    if restarted.is_set() and not around:
                        around.append(i)
                    if around and i - around[0] >= 1500:
                        break
                    if i % 50 == 0:
                        time.sleep(0.002)

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            poll(lambda: drain() or len(answered) >= 300, timeout=30, what="answers before the restart")
            redis_server.restart(kill=True)  # a crash; the append-only file keeps every acknowledged write
            restarted.set()
            producer.join(60)
            assert around and around[0] >= 300, "the restart came mid-stream"
            poll(lambda: drain() or len(answered) >= len(sent), timeout=60, what="all answers after the restart")
            assert sorted(answered) == sorted(sent)
            expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
            np.testing.assert_allclose(
                np.stack([answered[i].value() for i in sent]), expected[list(sent.values())], rtol=1e-5, atol=1e-6
            )
            st = handle.status()
            assert all(x["running"] for x in st["runners"]), st
            assert sum(x["reconnects"] for x in st["runners"]) >= 1, "the runners saw the restart"
    finally:
        handle.stop()


def test_fast_producer_never_grows_the_inbox_past_its_bound(client, redis_url, r):
    model = _slow_model("slow-redis-bp", client, delay=0.002)
    inbox = _inbox()
    cap = 300
    handle = deploy_pipeline(client, _pipeline(redis_url, inbox, model, partitions=1, max_batch_size=20))
    lengths: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(redis_url) as w:
            while not stop.is_set():
                lengths.append(w.xlen(inbox_stream(inbox, 0)))
                time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        transport = RedisTransport(redis_url, max_stream_length=cap)
        with dask.config.set(
            {"daskinfer.client.max-frame-requests": 1}
        ):  # one request per entry: the bound counts requests
            ic = InferenceClient(client, inbox=inbox, transport=transport, max_pending=500)
        with ic:
            n = 3000
            rows = np.arange(n, dtype=np.float32)[:, None]
            for i in range(n):
                ic.send(rows[i], key="one")
            results = collect_results(ic, n)
        stop.set()
        watcher.join(5)
        assert len({res.id for res in results}) == n
        np.testing.assert_allclose(np.stack([res.value() for res in results]), rows * 2)
        assert max(lengths) <= cap, "the inbox stream never holds more than its bound"
        assert max(lengths) >= cap // 2 and transport.full_waits > 0, "the producer really was faster than the model"
    finally:
        stop.set()
        handle.stop()
        undeploy(client, model)


@pytest.mark.slow  # a cluster of its own, a worker killed
def test_sigkill_a_worker_mid_stream_its_pending_entries_are_taken_over(redis_url, r, poll):
    """A runner killed with its worker: the partition's new runner claims what it had read and not acked."""
    import signal

    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        model = _slow_model("slow-kill", client, delay=0.003)  # slower than the producer: work is pending
        inbox = _inbox()
        handle = deploy_pipeline(client, _pipeline(redis_url, inbox, model, partitions=2, max_batch_size=20))
        rows = np.arange(6000, dtype=np.float32)[:, None]
        with InferenceClient(client, inbox=inbox, transport=RedisTransport(redis_url)) as ic:
            answered: dict[str, daskinfer.Result] = {}

            def drain() -> None:
                _drain(ic, answered)

            ids = [ic.send(rows[i], key=f"k{i % 5}", request_id=f"r{i}") for i in range(3000)]
            # the runner of partition 1 (4 of 5 keys) has read entries that it has not acknowledged
            poll(
                lambda: (
                    drain() or (len(answered) >= 100 and r.xpending(inbox_stream(inbox, 1), handle.name)["pending"] > 0)
                ),
                timeout=30,
                what="answers, and pending entries of partition 1",
            )
            victim = handle.status()["assigned"][1]
            os.kill(client.run(os.getpid)[victim], signal.SIGKILL)  # the runner dies with them; the nanny restarts it
            ids += [ic.send(rows[i], key=f"k{i % 5}", request_id=f"r{i}") for i in range(3000, 6000)]
            poll(lambda: drain() or len(answered) >= len(ids), timeout=60, what="all answers after the kill")
            assert sorted(answered) == sorted(ids), "nothing lost, nothing delivered twice"
            np.testing.assert_allclose(np.stack([answered[f"r{i}"].value() for i in range(6000)]), rows * 2)
        st = handle.status()
        print(
            "\nsigkill (redis): claimed",
            [x.get("claimed") for x in st["runners"]],
            "epochs",
            [x.get("epoch") for x in st["runners"]],
            "duplicates dropped",
            ic.duplicates,
        )
        assert len(st["assigned"]) == 2 and max(x["epoch"] for x in st["runners"]) > 2, "the partition moved"
        assert st["totals"]["claimed"] > 0, "the new runner took over the dead one's pending entries"
        for p in range(2):
            assert r.xpending(inbox_stream(inbox, p), handle.name)["pending"] == 0
            assert r.xlen(inbox_stream(inbox, p)) == 0
        handle.stop()
