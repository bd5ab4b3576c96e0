"""Shared fixtures: one small real Dask cluster for the whole session, and the bundled model.

The cluster is two one-thread worker processes (the machine has two cores).  Tests that
deploy models undeploy them again, so that tests stay independent while they share the
cluster.  A test that changes a cluster (scales it, kills or restarts a worker, restarts a
partition, sweeps the broker) has a cluster of its own: ``distributed.utils_test.gen_cluster``
(an in-process scheduler and workers) or a ``LocalCluster`` it starts itself.

``gen_cluster`` tests run first, before the session cluster starts: on the way in and out,
gen_cluster terminates every multiprocessing child of the test process and closes the default
client, which would be the session cluster's worker processes and client.
"""

from __future__ import annotations

import inspect

import pytest
import timing
from distributed import Client, LocalCluster

import daskinfer  # before distributed.utils_test: gen_cluster's config reset keeps daskinfer's defaults
from daskinfer.testing import bundled_model_path


@pytest.fixture
def poll():
    """``poll(condition, timeout=30, what=...)``: wait for a condition with a deadline, never a fixed sleep."""
    return timing.poll


@pytest.fixture(scope="session")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    with Client(cluster) as client:
        client.wait_for_workers(2)
        yield client


@pytest.fixture(scope="session")
def mlp_path() -> str:
    """Path of the bundled MLP (``x``: float32 [N, 16] -> ``probabilities``: float32 [N, 2])."""
    return bundled_model_path()


@pytest.fixture
def mlp_deployed(client, mlp_path):
    """The bundled MLP deployed as ``"mlp"`` on the session cluster for one test."""
    daskinfer.deploy(client, daskinfer.OnnxModel("mlp", mlp_path))
    yield "mlp"
    if "mlp" in daskinfer.deployed_models(client):
        daskinfer.undeploy(client, "mlp")


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", default="60", help="how long tests/test_soak.py runs (default 60 s)")


def _in_process_cluster_test(item: pytest.Item) -> bool:
    """Whether ``item`` is an async test run by a sync wrapper: ``gen_cluster`` or ``gen_test``."""
    fn = getattr(item, "function", None)
    return fn is not None and not inspect.iscoroutinefunction(fn) and inspect.iscoroutinefunction(inspect.unwrap(fn))


def pytest_collection_modifyitems(config, items):
    # in-process cluster tests first (see the module docstring); the others keep their order
    items.sort(key=lambda item: not _in_process_cluster_test(item))
    if timing.SCALE != 1:  # DASKINFER_TEST_TIMEOUT_SCALE: every test's timeout too
        default = float(config.getini("timeout") or 0)
        for item in items:
            marker = item.get_closest_marker("timeout")
            seconds = default
            if marker is not None:
                seconds = float(marker.args[0] if marker.args else marker.kwargs.get("timeout", default))
            if seconds:
                item.add_marker(pytest.mark.timeout(timing.scaled(seconds)), append=False)
