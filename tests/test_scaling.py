"""Adaptive scaling on inbox lag: the pure policy, and a real LocalCluster that grows and shrinks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

from daskinfer import InferenceClient, Pipeline, PythonModel, deploy, deploy_pipeline
from daskinfer.control.scaling import InferenceAdaptive, LoadSample, ScalingPolicy


def s(t, backlog, done, busy, workers):
    return LoadSample(time=t, backlog=backlog, done=done, busy=busy, workers=workers)


def test_lag_over_target_scales_up_in_proportion():
    p = ScalingPolicy(target_lag=0.5)
    # 1000 answered/s, 3000 queued: 3 s of lag, 6x the goal -> double (the most per step)
    assert p.target(s(0, 0, 0, 0, 2), s(1, 3000, 1000, 1.8, 2)) == 4
    # 750 queued at 1000/s: 0.75 s, 1.5x the goal -> +1 on 2 workers
    assert p.target(s(0, 0, 0, 0, 2), s(1, 750, 1000, 1.8, 2)) == 3
    # nothing answered while requests queue (e.g. model loading): +n
    assert p.target(s(0, 0, 0, 0, 1), s(1, 10, 0, 0, 1)) == 2


def test_small_lag_holds():
    p = ScalingPolicy(target_lag=0.5)
    assert p.target(s(0, 0, 0, 0, 3), s(1, 100, 1000, 2.5, 3)) == 3


def test_idle_scales_down_one_at_a_time_and_never_below_one():
    p = ScalingPolicy(target_lag=0.5, scale_down_busy=0.3)
    assert p.target(s(0, 0, 0, 0, 4), s(1, 0, 100, 0.2, 4)) == 3
    assert p.target(s(0, 0, 0, 0, 1), s(1, 0, 0, 0.0, 1)) == 1
    # busy models keep their workers: 2 workers at 80% would be 160% on one
    assert p.target(s(0, 0, 0, 0, 2), s(1, 0, 1000, 1.6, 2)) == 2


@pytest.fixture
def one_worker_cluster():
    # in-process workers (threads): scaling decides on inbox lag, whatever a worker runs in
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield cluster, client


def test_cluster_grows_under_lag_and_shrinks_when_idle(one_worker_cluster, poll):
    cluster, client = one_worker_cluster

    def slow(x):  # ~2 ms per batch: one worker falls behind the producer below
        time.sleep(0.002)
        return x + 1

    deploy(client, PythonModel("slow", slow))
    handle = deploy_pipeline(client, Pipeline(model="slow", inbox="scale", partitions=4, max_batch_size=8))
    cluster.adapt(Adaptive=InferenceAdaptive, minimum=1, maximum=2, interval="200ms", wait_count=2, target_lag="200ms")
    n_workers = lambda: len(client.scheduler_info()["workers"])  # noqa: E731
    with InferenceClient(client, inbox="scale") as ic:
        rows = np.arange(6000, dtype=np.float32)[:, None]
        futures = [ic.submit(r, key=f"k{i % 16}") for i, r in enumerate(rows)]
        poll(lambda: n_workers() == 2, timeout=60, what="a second worker under load")
        results = [f.result(120) for f in futures]
    assert all(r.ok for r in results)
    np.testing.assert_allclose(np.stack([r.value() for r in results]), rows + 1)
    poll(lambda: n_workers() == 1, timeout=60, what="scale down when idle")
    poll(lambda: len(handle.status()["assigned"]) == 4, timeout=30, what="the partitions on the remaining worker")
    handle.stop()
