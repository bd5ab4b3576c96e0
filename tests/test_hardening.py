"""Nothing lost, nothing wedged: the failure modes a careless or hostile caller found (issue 10).

Each test makes the fault happen for real: a request naming someone else's topic as its reply
target, a dead-letter topic nobody reads, a client that stops reading, a model that always
fails, a pipeline that goes away under a client.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import dask
import numpy as np
import pytest
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures: a real redis-server on loopback)

from daskinfer import InferenceClient, OnnxModel, Pipeline, PythonModel, deploy, deploy_pipeline, undeploy
from daskinfer.connectors.embedded import BrokerRPC, TopicSettings, ensure_broker_async
from daskinfer.exceptions import TopicFullError
from daskinfer.models.registry import ModelRegistry
from daskinfer.testing import random_rows
from daskinfer.wire import codec
from daskinfer.wire.messages import Request


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _topic_messages(client, topic: str) -> list[bytes]:
    async def read():
        b = BrokerRPC(client.scheduler)
        info = await b.info(topic)
        out = []
        for p in range(info["partitions"]):
            out += (await b.get(topic, p, 0, 1_000_000))["messages"]
        return out

    return client.sync(read)


@pytest.fixture(scope="module")
def mlp(client, mlp_path):
    client.sync(ensure_broker_async, client)
    deploy(client, OnnxModel("mlp-hard", mlp_path))
    yield "mlp-hard"
    undeploy(client, "mlp-hard")


def test_a_request_cannot_send_its_result_to_another_topic(client, mlp):
    tag = _tag()
    victim, dead = f"victim-{tag}", f"dead-{tag}"
    client.sync(BrokerRPC(client.scheduler).create_topic, victim, TopicSettings(partitions=1, retain=True))
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=f"in-{tag}", partitions=1, dead_letter=dead))
    try:
        with InferenceClient(client, inbox=f"in-{tag}", transport="topic") as ic:
            row = random_rows(1)[0]
            hostile = Request("hostile-1", {"x": row}, reply_to=victim).encode()
            client.sync(ic.transport.send, f"in-{tag}", [(0, hostile)])
            assert ic.submit({"x": row}).result(30).ok, "the pipeline goes on"
        assert _topic_messages(client, victim) == [], "nothing was injected into the victim topic"
        letters = [codec.decode(m) for m in _topic_messages(client, dead)]
        assert [(d["id"], d["error_type"]) for d in letters] == [("hostile-1", "ReplyTargetError")]
        assert victim in letters[0]["error"] and "not a client reply target" in letters[0]["error"]
    finally:
        handle.stop()


def test_a_pipeline_serves_only_the_models_it_allows(client, mlp, mlp_path):
    deploy(client, PythonModel("secret", lambda x: x * 0))
    tag = _tag()
    handle = deploy_pipeline(client, Pipeline(model=mlp, models=[mlp], inbox=f"in-{tag}", partitions=1))
    try:
        with InferenceClient(client, inbox=f"in-{tag}") as ic:
            r = ic.submit(random_rows(1)[0], model="secret").result(30)
            assert r.error_type == "ModelNotAllowedError" and "'secret' is not served by this pipeline" in r.error
            assert ic.submit(random_rows(1)[0], model=mlp).result(30).ok
    finally:
        handle.stop()
        undeploy(client, "secret")


def test_a_dead_letter_topic_nobody_reads_never_wedges_the_pipeline(client, mlp):
    tag = _tag()
    dead = f"dead-{tag}"
    with dask.config.set({"daskinfer.broker.retained-messages": 20, "daskinfer.broker.max-messages": 20}):
        handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=f"in-{tag}", partitions=1, dead_letter=dead))
    try:
        with InferenceClient(client, inbox=f"in-{tag}") as ic:
            bad = [ic.submit({"x": np.zeros(3, np.float32)}) for _ in range(50)]  # wrong shape: dead letters
            assert all(f.result(30).error_type == "InputValidationError" for f in bad)
            good = ic.submit(random_rows(1)[0]).result(30)
            assert good.ok, "a good request after 50 dead letters is answered"
        info = client.sync(BrokerRPC(client.scheduler).info, dead)
        assert info["dropped"] == 30 and sum(e - s for s, e in zip(info["start"], info["end"])) == 20
        status = handle.status()
        assert status["restarts"] == 0, "the dead-letter topic never pushed back on the partition"
    finally:
        handle.stop()


def test_the_reply_topic_of_a_client_that_stopped_reading_expires(client, mlp, poll):
    tag = _tag()
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=f"in-{tag}", partitions=1))
    try:
        with dask.config.set({"daskinfer.broker.reply-ttl": "1s"}):
            gone = InferenceClient(client, inbox=f"in-{tag}", transport="topic")
            gone.start()
        reply = gone.reply_target
        for f in [gone.submit(r) for r in random_rows(10)]:
            f.result(30)
        gone.transport.receive = lambda timeout: asyncio.sleep(timeout, [])  # stops reading, never closes

        def topic_exists() -> bool:
            return reply in client.sync(BrokerRPC(client.scheduler).list_topics)

        poll(lambda: not topic_exists(), interval=0.1, what="the abandoned reply topic deleted")
        with InferenceClient(client, inbox=f"in-{tag}") as ic:  # others go on
            assert ic.submit(random_rows(1)[0]).result(30).ok
    finally:
        handle.stop()


def test_a_model_that_always_fails_gets_a_bounded_number_of_calls():
    calls = []

    def broken(x):
        calls.append(len(x))
        raise RuntimeError("model is broken")

    pipe = Pipeline().infer(PythonModel("broken", broken, warmup=False))
    with dask.config.set({"daskinfer.pipeline.max-bisect-calls": 32}):
        out = pipe.run({"x": np.ones((4096, 4), np.float32)}, registry=ModelRegistry(), errors="return")
    assert all(e == "RuntimeError: model is broken" for e in out["error"]), "every row answered with the error"
    assert len(calls) <= 1 + 32, f"{len(calls)} calls for one batch (bisection must be bounded)"


def test_pending_requests_fail_when_their_pipeline_goes_away(client):
    def slow(x):
        time.sleep(0.05)
        return x

    deploy(client, PythonModel("slow-gone", slow))
    tag = _tag()
    handle = deploy_pipeline(client, Pipeline(model="slow-gone", inbox=f"in-{tag}", partitions=1, max_batch_size=1))
    try:
        with dask.config.set({"daskinfer.client.start-timeout": "1s"}):
            ic = InferenceClient(client, inbox=f"in-{tag}")
            ic.start()
        futures = [ic.submit(np.ones(2, np.float32)) for _ in range(200)]
        futures[0].result(60)
        handle.stop(drain=False)
        errors = []
        for f in futures[1:]:
            try:
                f.result(60)
            except Exception as e:  # noqa: BLE001 - what a caller sees
                errors.append(e)
        assert errors, "requests of a stopped pipeline fail instead of waiting forever"
        # each failed because its pipeline stopped (not because result() ran out of time)
        assert all("stopped and none took its place" in str(e) for e in errors), {type(e) for e in errors}
        with pytest.raises(ConnectionError, match="stopped receiving results"):
            ic.submit(np.ones(2, np.float32))
        ic.close()
    finally:
        undeploy(client, "slow-gone")


def test_an_async_client_pushes_back_instead_of_buffering_without_bound(cluster, mlp):
    from distributed import Client

    tag = _tag()

    async def run():
        async with Client(cluster.scheduler_address, asynchronous=True) as aclient:
            handle = await deploy_pipeline(aclient, Pipeline(model=mlp, inbox=f"in-{tag}", partitions=1))
            try:
                async with InferenceClient(aclient, inbox=f"in-{tag}", max_pending=100) as ic:
                    rows = random_rows(200)
                    futures, refused = [], 0
                    for r in rows:
                        try:
                            futures.append(ic.submit(r))
                        except TopicFullError as e:
                            refused += 1
                            assert "max_pending" in str(e)
                    done = await asyncio.gather(*futures)
                    return refused, len(done), all(d.ok for d in done)
            finally:
                await handle.stop()

    refused, answered, ok = asyncio.run(run())
    assert refused >= 100 and answered == 200 - refused and ok


def test_results_nobody_collects_are_bounded(client, mlp, poll):
    tag = _tag()
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=f"in-{tag}", partitions=1))
    try:
        with dask.config.set({"daskinfer.client.max-unclaimed": 50}):
            ic = InferenceClient(client, inbox=f"in-{tag}")
        with ic:
            for r in random_rows(300):
                ic.send(r)
            poll(lambda: ic.received == 300, what="all 300 results received")
            kept = list(ic.results(timeout=0))  # what is kept for results() is there by now
        assert ic.received == 300 and len(kept) == 50 and ic.unclaimed_dropped == 250
    finally:
        handle.stop()


def test_redis_a_reply_key_of_another_type_loses_no_batch(client, mlp, request):
    """Results for a key that is not a stream are dropped alone; the batch's other results are written."""
    import os

    if not os.environ.get("CI"):
        pytest.importorskip("redis", reason="the redis extra is not installed")
    import redis

    from daskinfer.connectors.redis import RedisTransport, inbox_stream

    url = request.getfixturevalue("redis_url")
    tag = _tag()
    inbox = f"rin-{tag}"
    handle = deploy_pipeline(
        client,
        Pipeline(
            model=mlp,
            inbox=inbox,
            partitions=1,
            connector="redis",
            outbox=f"rout-{tag}",
            dead_letter=f"rdead-{tag}",
            connector_options={"url": url},
        ),
    )
    r = redis.Redis.from_url(url)
    try:
        wrong = f"daskinfer-replies-{tag}-wrong"
        r.hset(wrong, "not", "a stream")  # a key with a reply prefix but of another type
        with InferenceClient(client, inbox=inbox, transport=RedisTransport(url)) as ic:
            row = random_rows(1)[0]
            hostile = [
                Request(f"h{i}", {"x": row}, reply_to=to).encode() for i, to in enumerate([wrong, f"{inbox}:meta"])
            ]
            client.sync(ic.transport.send, inbox, [(0, h) for h in hostile])
            good = [ic.submit(row) for _ in range(20)]
            assert all(f.result(30).ok for f in good), "the other results of the batch are written"
        letters = [codec.decode(f[b"d"]) for _, f in r.xrange(f"rdead-{tag}")]
        assert [(d["id"], d["error_type"]) for d in letters] == [("h1", "ReplyTargetError")]
        assert r.type(wrong) == b"hash" and r.type(f"{inbox}:meta") == b"hash", "nothing written into them"
        assert r.xpending(inbox_stream(inbox, 0), handle.name)["pending"] == 0, "nothing left pending"
        assert r.xlen(inbox_stream(inbox, 0)) == 0
        assert handle.status()["totals"]["answered"] >= 22
    finally:
        handle.stop()
        r.close()
