"""Pipelined partitions: batches in flight, answers in read order, faults contained where they arise.

A partition keeps reading while up to ``max_inflight`` batches run; answers leave in read order
(per-key order holds); whatever a request or a user's stage causes becomes error results for
the requests it touches, never a runner crash.  The models sleep (no CPU), so these tests hold
on a loaded machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import uuid

import concurrency_models
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster
from kafka_broker import kafka_bootstrap, kafka_broker  # noqa: F401  (fixtures)
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures)
from timing import scaled

from daskinfer import InferenceClient, Pipeline, PythonModel, deploy, deploy_pipeline, pipelines, undeploy
from daskinfer.exceptions import ConfigError

pytestmark = pytest.mark.timeout(150)

ROW = np.ones(4, np.float32)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _sleepy(name: str, seconds: float, instances: int, jitter: bool = False, count: bool = True) -> PythonModel:
    return PythonModel(
        name,
        concurrency_models.Sleepy(seconds, jitter=jitter, count=count),
        instances=instances,
        sample=np.ones((1, 4), np.float32),
    )


def _connector(kind: str, request) -> tuple[dict, object]:
    """Pipeline keyword arguments and the client transport of a connector (its server from the fixtures)."""
    if kind == "embedded":
        return {}, None
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        from daskinfer.connectors.redis import RedisTransport

        return {"connector": "redis", "connector_options": {"url": url}}, RedisTransport(url)
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    from daskinfer.connectors.kafka import KafkaTransport

    opts = {"bootstrap_servers": bootstrap, "exactly_once": False}
    return {"connector": "kafka", "connector_options": opts}, KafkaTransport(bootstrap)


@pytest.fixture
def sleepy_model(client):
    """A Python model (50 ms a call, 2 instances per worker) and a clean count of concurrent calls."""
    name = _name("sleepy")
    deploy(client, _sleepy(name, 0.05, instances=2))
    client.run(concurrency_models.reset)
    yield name
    undeploy(client, name)


@pytest.mark.parametrize("kind", ["embedded", "redis", pytest.param("kafka", marks=pytest.mark.slow)])
def test_model_calls_overlap_up_to_max_inflight_under_steady_traffic(client, sleepy_model, kind, request):
    """200 requests/s into one partition of a 50 ms model with 2 instances: while one batch runs
    the partition reads on and runs the next, so two model calls run at once."""
    kw, transport = _connector(kind, request)
    inbox = _name("overlap")
    handle = deploy_pipeline(
        client, Pipeline(model=sleepy_model, inbox=inbox, outbox=f"out-{inbox}", partitions=1, max_inflight=2, **kw)
    )
    try:
        with InferenceClient(client, inbox=inbox, transport=transport) as ic:
            futures = []
            for i in range(120):  # paced load: about 200 requests/s for 0.6 s
                futures.append(ic.submit(ROW * i))
                time.sleep(0.005)
            results = [f.result(60) for f in futures]
    finally:
        handle.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    np.testing.assert_array_equal(np.stack([r.value() for r in results]), np.stack([ROW * i * 2 for i in range(120)]))
    peaks = client.run(concurrency_models.peak)
    assert max(peaks.values()) == 2, f"model calls running at once, per worker: {peaks} (max_inflight=2)"


def test_per_key_order_holds_with_four_batches_in_flight_and_a_random_model_latency(client):
    name = _name("jitter")
    deploy(client, _sleepy(name, 0.02, instances=4, jitter=True))
    client.run(concurrency_models.reset)
    inbox = _name("order")
    handle = deploy_pipeline(client, Pipeline(model=name, inbox=inbox, partitions=2, max_inflight=4))
    keys = [f"k{i}" for i in range(6)]
    sent: dict[str, list[str]] = {k: [] for k in keys}
    key_of: dict[str, str] = {}
    value_of: dict[str, float] = {}
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            for i in range(1200):  # paced, so that batches are read while others run
                k = keys[i % len(keys)]
                rid = ic.send(ROW * i, key=k)
                sent[k].append(rid)
                key_of[rid] = k
                value_of[rid] = 2.0 * i
                time.sleep(0.002)
            arrived: list = []
            deadline = time.monotonic() + 90
            while len(arrived) < 1200 and time.monotonic() < deadline:
                arrived += list(ic.results(timeout=0.5))
    finally:
        handle.stop()
        undeploy(client, name)
    assert len(arrived) == 1200 and len({r.id for r in arrived}) == 1200, "every request answered exactly once"
    assert all(r.ok for r in arrived)
    for r in arrived:
        np.testing.assert_array_equal(r.value(), np.full(4, value_of[r.id], np.float32))
    for k in keys:
        assert [r.id for r in arrived if key_of[r.id] == k] == sent[k], f"answers of key {k!r} out of request order"
    peaks = client.run(concurrency_models.peak)
    assert max(peaks.values()) > 1, f"batches did not overlap (peak concurrent calls per worker: {peaks})"


def _note_object_column(cols):
    """Post-processing that returns an object column (which no wire can carry) for rows starting with -1."""
    out = {"y": cols["output"]}
    if (cols["output"][:, 0] == -2).any():
        out["note"] = np.array([{"why": "bad"}] * len(cols["output"]), dtype=object)
    return out


def test_a_stage_returning_an_object_column_fails_that_request_naming_stage_and_column(client, sleepy_model):
    inbox = _name("objcol")
    pipe = Pipeline(inbox=inbox).infer(sleepy_model).map_batches(_note_object_column, name="notes")
    handle = deploy_pipeline(client, pipe)
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            bad = ic.submit(-ROW).result(30)
            good = ic.submit(ROW).result(30)
        status = handle.status()
    finally:
        handle.stop()
    assert not bad.ok and bad.error_type == "StageError"
    assert "map_batches 'notes'" in bad.error and "'note'" in bad.error and "object" in bad.error, bad.error
    assert good.ok, good.error
    np.testing.assert_array_equal(good.outputs["y"], ROW * 2)
    assert status["restarts"] == 0 and not status["failures"], status


def test_a_stage_naming_a_function_that_does_not_exist_fails_the_deploy_naming_it(client, sleepy_model):
    for ref in ("json:no_such_function", "no_such_module_of_daskinfer:scale"):
        inbox = _name("missing")
        pipe = Pipeline(inbox=inbox).infer(sleepy_model).map_batches(ref)
        with pytest.raises(ConfigError, match=ref):
            deploy_pipeline(client, pipe, timeout=30)
        assert inbox not in pipelines(client), "nothing stays deployed"


@pytest.fixture
def own_cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2)
            yield cluster, client


@pytest.mark.slow  # a cluster of its own, a worker killed
def test_a_worker_killed_with_four_batches_in_flight_loses_and_repeats_nothing(own_cluster):
    cluster, client = own_cluster
    name = _name("slow")
    deploy(client, _sleepy(name, 0.3, instances=4))
    client.run(concurrency_models.reset)
    inbox = _name("kill")
    handle = deploy_pipeline(client, Pipeline(model=name, inbox=inbox, partitions=1, max_inflight=4))
    owner = handle.status()["assigned"][0]
    pid = client.run(os.getpid, workers=[owner])[owner]
    n = 200
    killed = False
    with InferenceClient(client, inbox=inbox) as ic:
        ids = {}
        for i in range(n):  # paced: each read is a batch of its own, and the partition reads on while they run
            ids[ic.send(ROW * i)] = 2.0 * i
            time.sleep(0.01)
            if not killed and i % 4 == 3 and client.run(concurrency_models.peak, workers=[owner])[owner] == 4:
                os.kill(pid, signal.SIGKILL)  # four batches in flight there now
                killed = True
        assert killed, "four batches were never in flight on the partition's worker"
        arrived = []
        deadline = time.monotonic() + 90
        while len(arrived) < n and time.monotonic() < deadline:
            arrived += list(ic.results(timeout=0.5))
        duplicates = ic.duplicates
    handle.stop()
    got = [r.id for r in arrived]
    assert len(got) == len(set(got)), "a request answered twice reached the caller"
    assert set(got) == set(ids), f"{len(set(ids) - set(got))} of {n} requests lost"
    assert all(r.ok for r in arrived)
    for r in arrived:
        np.testing.assert_array_equal(r.value(), np.full(4, ids[r.id], np.float32))
    assert duplicates >= 0  # answers the old owner sent before it died may arrive again: dropped by id


def test_a_shadow_ten_times_slower_leaves_the_answers_latency_alone(client):
    main, slow = _name("main"), _name("shadow")
    # 100 ms calls: 20% is 20 ms, more than what a loaded machine adds to one request's overhead
    deploy(client, _sleepy(main, 0.1, instances=1, count=False))
    deploy(client, _sleepy(slow, 1.0, instances=1, count=False))
    plain = Pipeline(model=main, inbox=_name("plain"), partitions=1)
    shadowed = Pipeline(inbox=_name("shadowed"), partitions=1).infer(main).shadow(slow)
    handles = [deploy_pipeline(client, plain), deploy_pipeline(client, shadowed)]
    lat: dict[str, list[float]] = {"plain": [], "shadowed": []}
    try:
        with InferenceClient(client, inbox=plain.inbox) as a, InferenceClient(client, inbox=shadowed.inbox) as b:
            for i in range(16):  # one request at a time, alternating, so both see the same machine
                for label, ic in (("plain", a), ("shadowed", b)):
                    t0 = time.perf_counter()
                    r = ic.submit(ROW * i).result(30)
                    lat[label].append(time.perf_counter() - t0)
                    assert r.ok, r.error
                    np.testing.assert_array_equal(r.value(), ROW * i * 2)
        status = handles[1].status()
    finally:
        for h in handles:
            h.stop()
        undeploy(client, main)
        undeploy(client, slow)
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    assert p50["shadowed"] <= 1.2 * p50["plain"], f"p50 with a slow shadow {p50} (within 20% expected)"
    shadow = [r.get("shadow") or {} for r in status["runners"]]
    assert sum(s.get("dropped", 0) for s in shadow) > 0, f"the shadow fell behind and dropped work: {shadow}"


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1)],
    timeout=scaled(90),
    config={
        "daskinfer.pipeline.max-restarts": 3,
        "daskinfer.pipeline.restart-window": "20s",
        "daskinfer.pipeline.restart-backoff": "100ms",
    },
)
async def test_a_partition_that_keeps_crashing_fails_its_requests_with_the_cause(c, s, a, monkeypatch):
    """A bug of ours (here: an injected one) crashes the partition whenever it reads: after
    ``max-restarts`` restarts within ``restart-window`` its waiting requests fail naming the cause,
    and ``status()`` shows it.  (An in-process cluster: the bug is injected into its worker.)"""
    from daskinfer.dataflow import nodes

    def broken(*args, **kwargs):
        raise RuntimeError("injected bug in decoding")

    name = _name("crash")
    await deploy(c, _sleepy(name, 0.001, instances=1, count=False))
    handle = await deploy_pipeline(c, Pipeline(model=name, inbox=_name("crashy"), partitions=1))
    monkeypatch.setattr(nodes, "decode_read", broken)
    async with InferenceClient(c, inbox=handle.inbox) as ic:
        t0 = time.monotonic()
        futures = [ic.submit(ROW * i) for i in range(5)]
        failed = await asyncio.wait_for(asyncio.gather(*futures), scaled(40))
        took = time.monotonic() - t0
        status = await handle.status()
    await handle.stop()
    assert took < 20 + 5, f"requests failed after {took:.1f}s (restart-window 20s)"
    for r in failed:
        assert not r.ok and r.error_type == "PartitionFailedError", (r.error_type, r.error)
        assert "injected bug in decoding" in r.error and "3 restarts" in r.error, r.error
    assert "injected bug in decoding" in status["failures"][0], status


# -- moves and clocks -----------------------------------------------------------------------------


def _routes(client, inbox: str) -> dict:
    async def get():
        return await client.scheduler.daskinfer_routes(inbox=inbox, version=None, timeout=0)

    return client.sync(get)


@pytest.mark.slow  # a cluster of its own, a model that loads for 3 s
def test_a_moved_partition_is_routed_to_once_it_serves_and_keeps_key_order(poll):
    """A worker joins; its model takes 3 s to load.  The partition that moves there drains on the
    old worker first, and clients are routed to the new one only once its runner reads: every
    route seen points at a running runner, and answers keep their keys' order across the move."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            name = _name("bigload")
            model = PythonModel(
                name,
                concurrency_models.Sleepy(0.02, count=False, load_seconds=3.0),
                instances=2,
                sample=np.ones((1, 4), np.float32),
            )
            deploy(client, model)
            inbox = _name("moving")
            handle = deploy_pipeline(client, Pipeline(model=name, inbox=inbox, partitions=2, max_inflight=2))
            (first,) = client.scheduler_info()["workers"]
            keys = [f"k{i}" for i in range(4)]
            sent: dict[str, list[str]] = {k: [] for k in keys}
            key_of: dict[str, str] = {}
            bad_routes = []
            moved_at = None
            with InferenceClient(client, inbox=inbox) as ic:
                cluster.scale(2)
                deadline = time.monotonic() + 90
                i = 0
                while time.monotonic() < deadline:
                    for _ in range(10):
                        k = keys[i % len(keys)]
                        rid = ic.send(ROW * i, key=k)
                        sent[k].append(rid)
                        key_of[rid] = k
                        i += 1
                    owners = _routes(client, inbox).get("owners") or {}
                    runners = handle.status()["runners"]
                    states = {(r["partition"], r["worker"]): r["state"] for r in runners if "partition" in r}
                    for p, w in owners.items():  # (a runner that stopped since is a move that began: fine)
                        if states.get((int(p), w)) == "starting":
                            bad_routes.append((p, w, states.get((int(p), w))))
                    if moved_at is None and any(w != first for w in owners.values()):
                        moved_at = i
                    if moved_at is not None and i > moved_at + 200:
                        break
                    time.sleep(0.01)
                assert moved_at is not None, "no partition moved to the new worker"
                arrived: list = []
                end = time.monotonic() + 60
                while len(arrived) < i and time.monotonic() < end:
                    arrived += list(ic.results(timeout=0.5))
            handle.stop()
    assert not bad_routes, f"clients were routed to runners that did not serve yet: {bad_routes[:5]}"
    ids = [r.id for r in arrived]
    assert len(ids) == len(set(ids)) == i, f"{i - len(set(ids))} lost, {len(ids) - len(set(ids))} twice"
    assert all(r.ok for r in arrived), [r.error for r in arrived if not r.ok][:3]
    for k in keys:
        assert [r.id for r in arrived if key_of[r.id] == k] == sent[k], f"key {k!r} out of order across the move"


FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.mark.skipif(
    not os.path.exists(FAKETIME_LIB) and not os.environ.get("CI"), reason="libfaketime is not installed (faketime)"
)
@pytest.mark.slow  # dask CLI processes, two skewed workers
def test_a_deadline_is_a_budget_a_worker_clock_that_is_off_neither_expires_nor_extends_it(tmp_path, poll):
    """The worker's clock is an hour ahead, then an hour behind (libfaketime): a request with 10 s
    left is answered, and one with 0.3 s left that waits behind a 1 s batch is not."""
    from dask_processes import DaskProcesses

    procs = DaskProcesses(tmp_path)
    procs.env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))  # concurrency_models for the workers
    procs.scheduler()
    try:
        with Client(procs.address) as client:
            for skew in ("+1h", "-1h"):
                procs.env.update(LD_PRELOAD=FAKETIME_LIB, FAKETIME=skew)  # (its monotonic clock moves by as much)
                worker = procs.worker(f"skewed{skew}", nanny=False)
                for k in ("LD_PRELOAD", "FAKETIME"):
                    procs.env.pop(k)
                client.wait_for_workers(1, timeout=60)
                (addr,) = client.scheduler_info()["workers"]
                off = client.run(time.time, workers=[addr])[addr] - time.time()
                assert abs(abs(off) - 3600) < 60, f"the worker's clock is off by {off:.0f}s, not an hour"
                name = _name("slow")
                deploy(client, _sleepy(name, 1.0, instances=1, count=False))
                pipe = Pipeline(model=name, inbox=_name("skew"), partitions=1, max_inflight=1)  # one batch at a time
                handle = deploy_pipeline(client, pipe)
                with InferenceClient(client, inbox=handle.inbox) as ic:
                    ok = ic.submit(ROW, deadline=10.0).result(30)
                    ahead = ic.submit(np.ones(3, np.float32))  # holds the model for 1 s (another shape: its own call)
                    late = ic.submit(ROW, deadline=0.3).result(30)
                    assert ahead.result(30).ok
                handle.stop()
                undeploy(client, name)
                assert ok.ok, f"clock {skew}: a request with 10 s left failed: {ok.error}"
                assert not late.ok and late.error_type == "DeadlineExceededError", (skew, late.error_type, late.error)
                worker.terminate()
                worker.wait(20)
                poll(lambda: not client.scheduler_info()["workers"], what=f"the worker with clock {skew} gone")
    finally:
        procs.stop()
