"""A RemoteModel deployed on a real distributed cluster (2 worker processes, 1 thread each).

The daskinfer model server runs in the test process on 127.0.0.1; the workers each open
their own channel to it (in the plugin's worker, lazily on first use) and answer
``source.scatter().infer(name).gather()`` exactly as local inference does.
"""

from __future__ import annotations

import numpy as np
import pytest
from streamz import Stream

import daskinfer
from daskinfer import ModelServer, OnnxModel, RemoteModel
from daskinfer.testing import random_rows, run_onnx_directly


@pytest.fixture(scope="module")
def model_server(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, http_port=0) as s:
        yield s


@pytest.mark.parametrize("protocol", ["kserve-grpc", "kserve-rest"])
def test_dask_stream_through_a_remote_model(client, model_server, mlp_path, poll, protocol):
    url = model_server.grpc_address if protocol == "kserve-grpc" else model_server.http_url
    daskinfer.deploy(client, RemoteModel("mlp-remote", url, protocol=protocol, remote_name="mlp", max_batch_size=64))
    try:
        out = []
        source = Stream(asynchronous=False)  # built after the Client exists
        source.scatter().infer("mlp-remote").buffer(8).gather().sink(out.append)
        blocks = [random_rows(n, seed=i) for i, n in enumerate([1, 7, 130, 2, 50] * 4)]
        for b in blocks:
            source.emit(b)
        poll(lambda: len(out) == len(blocks), what="all blocks answered")
        for b, o in zip(blocks, out):
            np.testing.assert_array_equal(o["probabilities"], run_onnx_directly(mlp_path, {"x": b})["probabilities"])
    finally:
        daskinfer.undeploy(client, "mlp-remote")


async def _apredict_on_worker(name, x, dask_worker=None):
    from daskinfer.models.registry import registry_for

    dep = registry_for(dask_worker).get(name)
    out = await dep.apredict(x)  # the worker's own event loop: the pipeline's path
    return out["probabilities"], dep.first.stats.calls


def test_worker_event_loop_path(client, model_server, mlp_path):
    daskinfer.deploy(
        client, RemoteModel("mlp-remote", model_server.grpc_address, remote_name="mlp", max_batch_size=100)
    )
    try:
        x = random_rows(250, seed=5)
        results = client.run(_apredict_on_worker, "mlp-remote", x)
        assert len(results) == 2
        want = run_onnx_directly(mlp_path, {"x": x})["probabilities"]
        for got, calls in results.values():
            np.testing.assert_array_equal(got, want)
            assert calls == 3  # 250 rows in calls of at most 100
    finally:
        daskinfer.undeploy(client, "mlp-remote")


def test_pipeline_request_deadline_bounds_a_remote_call(client, mlp_path):
    """A request's deadline reaches the remote model: a slow service answers it with a
    deadline error in about that time, not after the model's own (long) deadline."""
    import time
    import uuid

    from daskinfer import InferenceClient, Pipeline, PythonModel, deploy_pipeline

    def slow(x):  # 3 s for ones, 0.2 s for smaller values (the warm-up batch of zeros, the last request)
        time.sleep(3.0 if x.size and float(x.max()) >= 1 else 0.2)
        return x * 2

    with ModelServer(
        PythonModel("slow", slow, inputs={"x": ("float32", (None, 4))}), grpc_port=0, serve_http=False
    ) as s:
        daskinfer.deploy(client, RemoteModel("slow-remote", s.grpc_address, remote_name="slow", deadline=30, retries=0))
        inbox = f"remote-{uuid.uuid4().hex[:6]}"
        handle = deploy_pipeline(client, Pipeline(model="slow-remote", inbox=inbox, partitions=1))
        try:
            with InferenceClient(client, inbox=inbox) as ic:
                t0 = time.monotonic()
                r = ic.submit(np.ones(4, np.float32), deadline=0.4).result(60)
                took = time.monotonic() - t0
                assert not r.ok and r.error_type == "RemoteModelError" and "deadline" in r.error.lower(), (
                    r.error_type,
                    r.error,
                )
                assert took < 2.5, f"answered after {took:.2f}s: the 0.4 s deadline did not reach the 3 s call"
                ok = ic.submit(np.full(4, 0.5, np.float32)).result(60)  # no deadline: the slow answer comes
                np.testing.assert_array_equal(ok.value(), np.full(4, 1, np.float32))
        finally:
            handle.stop()
            daskinfer.undeploy(client, "slow-remote")


def test_deploy_checks_that_the_service_answers_and_leaves_nothing_when_it_does_not(client, model_server):
    import socket

    from daskinfer.exceptions import ModelLoadError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ModelLoadError, match=rf"the service at 127\.0\.0\.1:{port} \(kserve-grpc\) did not answer"):
        daskinfer.deploy(client, RemoteModel("nobody-home", f"127.0.0.1:{port}", timeout=2))
    with pytest.raises(ModelLoadError, match=r"says model 'no-such-model' is not ready or not known there"):
        daskinfer.deploy(client, RemoteModel("unknown-remote", model_server.grpc_address, remote_name="no-such-model"))
    assert "nobody-home" not in daskinfer.deployed_models(client)
    assert "unknown-remote" not in daskinfer.deployed_models(client)
    # deploying before the service is up stays possible
    daskinfer.deploy(client, RemoteModel("later", f"127.0.0.1:{port}"), validate=False)
    try:
        assert daskinfer.deployed_models(client)["later"] == ["1"]
    finally:
        daskinfer.undeploy(client, "later")
