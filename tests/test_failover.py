"""Nothing lost when workers die, join or leave (embedded broker).

These tests own their cluster, since they kill and add workers.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.testing import random_rows, run_onnx_directly


@pytest.fixture
def own_cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2)
            yield cluster, client


def test_partitions_follow_workers_that_join_and_leave(own_cluster, mlp_path, poll):
    cluster, client = own_cluster
    deploy(client, OnnxModel("mlp", mlp_path))
    handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="elastic", partitions=4))
    rows = random_rows(20_000, seed=4)
    expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
    with InferenceClient(client, inbox="elastic") as ic:
        futures = [ic.submit(rows[i], key=f"k{i % 5}") for i in range(5000)]
        cluster.scale(3)
        poll(
            lambda: len(set(handle.status()["assigned"].values())) == 3,
            timeout=60,
            what="a partition on the new worker",
        )
        futures += [ic.submit(rows[i], key=f"k{i % 5}") for i in range(5000, 12_000)]
        cluster.scale(1)
        poll(lambda: len(client.scheduler_info()["workers"]) == 1, timeout=60, what="scale down to one worker")
        futures += [ic.submit(rows[i], key=f"k{i % 5}") for i in range(12_000, 20_000)]
        results = [f.result(60) for f in futures]
    assert all(r.ok for r in results)
    np.testing.assert_allclose(np.stack([r.value() for r in results]), expected, rtol=1e-5, atol=1e-6)
    (only,) = client.scheduler_info()["workers"]
    poll(lambda: len(handle.status()["assigned"]) == 4, timeout=30, what="every partition on the last worker")
    status = handle.status()
    assert set(status["assigned"].values()) == {only}
    assert status["moves"] >= 1
    handle.stop()


def test_a_runner_that_stops_by_itself_is_restarted(own_cluster, mlp_path, poll):
    cluster, client = own_cluster
    deploy(client, OnnxModel("mlp", mlp_path))
    handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="phoenix", partitions=2))
    rows = random_rows(2000, seed=6)
    with InferenceClient(client, inbox="phoenix") as ic:
        assert all(f.result(30).ok for f in [ic.submit(r, key="a") for r in rows[:1000]])
        worker = handle.status()["assigned"][0]

        async def kill_runner():  # what a runner does when its broker calls fail
            await client.rpc(worker).daskinfer_runner_stop(pipeline="phoenix", partition=0, drain=False)

        client.sync(kill_runner)
        poll(lambda: handle.status()["restarts"] >= 1, timeout=30, what="the controller to restart the partition")
        results = [f.result(30) for f in [ic.submit(r, key=f"k{i}") for i, r in enumerate(rows[1000:])]]
    assert all(r.ok for r in results)
    expected = run_onnx_directly(mlp_path, {"x": rows[1000:]})["probabilities"]
    np.testing.assert_allclose(np.stack([r.value() for r in results]), expected, rtol=1e-5, atol=1e-6)
    poll(lambda: all(r["state"] == "running" for r in handle.status()["runners"]), timeout=30, what="all runners")
    handle.stop()
