"""Shared fixtures: one small real Dask cluster for the whole session, and the bundled model.

The cluster is two one-thread worker processes (the machine has two cores).  Tests
that deploy models undeploy them again, so that tests stay independent while they
share the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from distributed import Client, LocalCluster

import daskinfer
from daskinfer.testing import bundled_model_path


def _poll(
    condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.005, what: str = "condition"
) -> None:
    """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def poll():
    """``poll(condition, timeout=30, what=...)``: wait for a condition with a deadline, never a fixed sleep."""
    return _poll


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
