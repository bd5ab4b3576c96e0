"""Chaos: 50,000 requests through each broker while a worker process is SIGKILLed (and its
nanny starts another) and, for Redis and Kafka, the broker crashes and restarts (Redis with
append-only persistence).  Every request must be answered once, with the right output.
"""

from __future__ import annotations

import os
import signal
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from kafka_broker import kafka_bootstrap, kafka_broker  # noqa: F401  (fixtures: a real Kafka broker on loopback)
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures: a real redis-server on loopback)

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = pytest.mark.slow  # 50,000 requests per broker, a cluster of its own, a worker and the broker killed

N = 50_000


@pytest.fixture(scope="module")
def own_cluster():
    """The chaos tests' cluster (not the session's: they kill its workers); each test ends with
    two workers again, its nanny having replaced the one it killed.

    ``distributed.deploy.lost-worker-timeout`` is raised for this cluster: SpecCluster, on a worker's
    removal, starts a timer (15 s) that closes the worker's nanny for good if, when it fires, no worker
    of that name is registered. These tests kill the same nanny's worker every few seconds, so a timer
    left by one kill can fire while the nanny restarts the worker after the next one, and the nanny is
    closed instead of replacing it (seen under a CPU hog; reproduced with a bare LocalCluster: kill a
    worker, then kill its replacement just before the timeout has passed, and no worker comes back).
    """
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(2)
                yield client


@pytest.mark.parametrize("broker", ["embedded", "redis", "kafka-at-least-once"])
def test_50k_requests_through_a_worker_kill_and_a_broker_restart(broker, own_cluster, mlp_path, request, poll):
    """(Kafka exactly once: ``tests/test_kafka.py``, read back by an independent read_committed consumer.)"""
    client = own_cluster
    deploy(client, OnnxModel("mlp", mlp_path))
    transport, server, kw = None, None, {}
    if broker == "redis":
        if not os.environ.get("CI"):  # in CI a missing redis extra must fail, not skip
            pytest.importorskip("redis", reason="the redis extra is not installed")
        server = request.getfixturevalue("redis_server")
        url = request.getfixturevalue("redis_url")
        from daskinfer.connectors.redis import RedisTransport

        transport = RedisTransport(url)
        kw = {"connector": "redis", "connector_options": {"url": url}, "outbox": f"out-chaos-{os.getpid()}"}
    elif broker.startswith("kafka"):
        server = request.getfixturevalue("kafka_broker")  # skips (fails in CI) without java, jars or the extra
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        from daskinfer.connectors.kafka import KafkaTransport

        transport = KafkaTransport(bootstrap)
        kw = {
            "connector": "kafka",
            "connector_options": {"bootstrap_servers": bootstrap, "exactly_once": False},
            "outbox": f"out-chaos-{os.getpid()}",
        }
    inbox = f"chaos-{broker}-{time.monotonic_ns()}"
    handle = deploy_pipeline(client, Pipeline(model="mlp", inbox=inbox, partitions=4, max_batch_size=256, **kw))
    rows = random_rows(N, seed=3)
    expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
    results: dict = {}
    delivered_twice = 0

    def drain(ic, until: int, timeout: float) -> None:
        nonlocal delivered_twice
        end = time.monotonic() + timeout
        for r in ic.results(timeout=15):  # a partition may take seconds to move off a killed worker
            if r.id in results:
                delivered_twice += 1
            results[r.id] = r
            if len(results) >= until or time.monotonic() > end:
                return

    with InferenceClient(client, inbox=inbox, transport=transport) as ic:
        for i in range(N // 2):
            ic.send(rows[i], key=f"k{i % 13}", request_id=f"r{i}")
        drain(ic, N // 8, 60)
        pid = sorted(client.run(os.getpid).items())[0][1]
        os.kill(pid, signal.SIGKILL)  # mid-stream: its nanny starts another worker
        for i in range(N // 2, N):
            ic.send(rows[i], key=f"k{i % 13}", request_id=f"r{i}")
        if server is not None:
            drain(ic, N // 2, 60)
            server.restart(kill=True)  # a crash; Redis's append-only file or Kafka's log keeps acknowledged writes
        drain(ic, N, 120)
        lost = N - len(results)
        print(
            f"\nchaos ({broker}): sent {N}, answered {len(results)}, lost {lost}, delivered twice "
            f"{delivered_twice}, duplicates dropped by the client {ic.duplicates}"
        )
        assert lost == 0, f"{lost} requests lost"
        assert delivered_twice == 0
        assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok][:3]
        got = np.stack([results[f"r{i}"].value() for i in range(N)])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    try:
        poll(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=60, what="the replacement worker")
    except pytest.fail.Exception:  # say why: the nannies' and workers' own logs (seen once under a CPU hog)
        logs = client.get_worker_logs(n=40, nanny=True)
        tails = "\n".join(f"--- nanny {addr}\n" + "\n".join(msg for _, msg in lines) for addr, lines in logs.items())
        pytest.fail(f"the nanny's replacement worker did not join within 60 s; the cluster's logs:\n{tails}")
    handle.stop()
