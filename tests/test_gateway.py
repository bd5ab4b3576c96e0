"""The gateway in front of real pipelines on the session's LocalCluster.

Answers equal the model run directly; a slow pipeline gives 504 / DEADLINE_EXCEEDED, a
full one 503 / RESOURCE_EXHAUSTED with Retry-After; several gateways front one pipeline;
a model's exception text stays in the log; ``daskinfer gateway`` runs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from cli_process import serving

from daskinfer import OnnxModel, Pipeline, PythonModel, deploy, deploy_pipeline, undeploy
from daskinfer.exceptions import ConfigError, ModelNotFoundError
from daskinfer.models.deploy import model_metadata
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.gateway import Gateway, Route
from daskinfer.testing import random_rows, run_onnx_directly


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _post_json(url: str, body: dict, timeout: float = 30) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _v2_body(x: np.ndarray, name: str = "x") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _grpc_request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


@contextlib.contextmanager
def pipeline_of(client, model, **pipeline_kwargs):
    """Deploy ``model`` and a pipeline for it on a fresh inbox; yield the inbox."""
    deploy(client, model)
    inbox = _unique(f"{model.name}-in")
    handle = deploy_pipeline(client, Pipeline(model=model.name, inbox=inbox, **pipeline_kwargs))
    try:
        yield inbox
    finally:
        handle.stop()
        undeploy(client, model.name)


@pytest.fixture(scope="module")
def mlp_inbox(client, mlp_path):
    with pipeline_of(client, OnnxModel("gw-mlp", mlp_path), partitions=2) as inbox:
        yield inbox


def test_model_metadata_reads_the_deployed_specs(client, mlp_inbox):
    meta = model_metadata(client, "gw-mlp")
    assert (meta.name, meta.version, meta.kind) == ("gw-mlp", "1", "onnx")
    assert [s.describe() for s in meta.inputs] == ["x: float32[N, 16]"]
    assert [s.describe() for s in meta.outputs] == ["probabilities: float32[N, 2]"]
    with pytest.raises(ModelNotFoundError, match="'not-deployed'"):
        model_metadata(client, "not-deployed")


def test_binds_loopback_by_default_and_checks_its_arguments(cluster):
    gw = Gateway(cluster, {"m": "inbox"})
    assert gw.host == "127.0.0.1" and gw.routes == [Route("m", "inbox")]
    assert Route.parse("a=in:model") == Route("a", "in", "model")
    with pytest.raises(ConfigError, match="NAME=INBOX"):
        Route.parse("no-inbox")
    with pytest.raises(ConfigError, match="at least one pipeline"):
        Gateway(cluster, {})
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        Gateway(cluster, {"m": "inbox"}, tls_cert=b"x")


def test_a_model_that_is_not_deployed_fails_at_start(cluster):
    gw = Gateway(cluster, {"ghost": "ghost-in"}, grpc_port=0, http_port=0)
    with pytest.raises(ConfigError, match="'ghost'.*is not deployed"):
        gw.start()
    assert not gw.running


def test_two_gateways_front_one_pipeline(cluster, mlp_inbox, mlp_path):
    """Gateways keep no state of their own: each answers, and one goes on when the other stops."""
    with (
        Gateway(cluster, {"mlp": f"{mlp_inbox}:gw-mlp"}, grpc_port=0, http_port=0) as a,
        Gateway(cluster, [Route("mlp", mlp_inbox, "gw-mlp")], grpc_port=0, http_port=0) as b,
    ):
        xs = {i: random_rows(i + 1, seed=i) for i in range(6)}

        def call(i):
            gw = (a, b)[i % 2]
            return _post_json(f"{gw.http_url}/v2/models/mlp/infer", _v2_body(xs[i]))

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, xs))
        for i, (status, _, resp) in enumerate(answers):
            assert status == 200, resp
            got = np.asarray(resp["outputs"][0]["data"], dtype=np.float32).reshape(len(xs[i]), 2)
            np.testing.assert_array_equal(got, run_onnx_directly(mlp_path, {"x": xs[i]})["probabilities"])
        a.stop()
        status, _, resp = _post_json(f"{b.http_url}/v2/models/mlp/infer", _v2_body(xs[0]))
        assert status == 200


def test_bad_requests_are_400_and_never_reach_the_pipeline(cluster, mlp_inbox):
    with Gateway(cluster, {"mlp": f"{mlp_inbox}:gw-mlp"}, grpc_port=0, http_port=0) as gw:
        url = f"{gw.http_url}/v2/models/mlp/infer"
        status, _, resp = _post_json(url, _v2_body(random_rows(2, n_in=15)))
        assert status == 400 and "expects shape [N, 16]" in resp["error"]
        two = _v2_body(random_rows(2))
        two["inputs"].append(_v2_body(random_rows(2), name="y")["inputs"][0])
        status, _, resp = _post_json(url, two)
        assert status == 400 and "unexpected input 'y'" in resp["error"]
        assert gw.service.statistics("mlp")["model_stats"][0]["inference_stats"]["fail"]["count"] == 2
        with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_grpc_request("mlp", random_rows(2, n_in=15)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def sleepy(x):
    import time

    if x.size and float(x.max()) > 0:  # the warm-up batch is zeros: it goes through at once
        time.sleep(float(x.max()))
    return {"y": x * 2}


def test_no_answer_in_time_is_504_and_deadline_exceeded(client, cluster):
    model = PythonModel(_unique("sleepy"), sleepy, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    with (
        pipeline_of(client, model, partitions=1) as inbox,
        Gateway(cluster, {"sleepy": f"{inbox}:{model.name}"}, grpc_port=0, http_port=0, timeout=0.3) as gw,
    ):
        status, _, resp = _post_json(
            f"{gw.http_url}/v2/models/sleepy/infer", _v2_body(np.full((1, 1), 1.5, np.float32))
        )
        assert status == 504 and "timeout" in resp["error"]
        with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            req = pb.ModelInferRequest(model_name="sleepy")
            req.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            req.raw_input_contents.append(np.full((1, 1), 1.5, np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(req)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # once the slow calls are through, the same pipeline answers in time again
            req.raw_input_contents[0] = np.zeros((1, 1), np.float32).tobytes()
            deadline = time.monotonic() + 30
            while True:
                try:
                    resp = stub.ModelInfer(req, timeout=30)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < deadline
            assert np.frombuffer(resp.raw_output_contents[0], "<f4").tolist() == [0.0]


def test_too_many_calls_at_once_is_503_with_retry_after(client, cluster, poll):
    model = PythonModel(_unique("sleepy"), sleepy, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    with (
        pipeline_of(client, model, partitions=1) as inbox,
        Gateway(cluster, {"sleepy": f"{inbox}:{model.name}"}, grpc_port=0, http_port=0, max_concurrent_calls=1) as gw,
    ):
        slow = _v2_body(np.full((1, 1), 2.0, np.float32))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post_json, f"{gw.http_url}/v2/models/sleepy/infer", slow)
            poll(lambda: gw.service.inflight == 1, what="the slow call to be in flight")
            status, headers, resp = _post_json(f"{gw.http_url}/v2/models/sleepy/infer", slow)
            assert status == 503 and headers["Retry-After"] == "1" and "limit 1" in resp["error"]
            with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
                call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.with_call
                req = pb.ModelInferRequest(model_name="sleepy")
                req.inputs.add(name="x", datatype="FP32", shape=[1, 1])
                req.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
                with pytest.raises(grpc.RpcError) as info:
                    call(req)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("retry-after", "1") in tuple(info.value.trailing_metadata())
            assert first.result(30)[0] == 200


def test_a_full_pipeline_is_503_with_retry_after(client, cluster, poll):
    """A pipeline that holds as many unanswered requests as the gateway allows refuses the next one."""
    model = PythonModel(_unique("sleepy"), sleepy, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    with (
        pipeline_of(client, model, partitions=1) as inbox,
        Gateway(cluster, {"sleepy": f"{inbox}:{model.name}"}, grpc_port=0, http_port=0, max_pending=1) as gw,
    ):
        url = f"{gw.http_url}/v2/models/sleepy/infer"
        pipeline_client = gw.service.models()["sleepy"].client
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_post_json, url, _v2_body(np.full((1, 1), 2.0, np.float32)))
            poll(lambda: pipeline_client.pending == 1, what="the slow request to be in the pipeline")
            status, headers, resp = _post_json(url, _v2_body(np.zeros((1, 1), np.float32)))
            assert status == 503 and headers["Retry-After"] == "1" and "the pipeline is full" in resp["error"]
            assert slow.result(30)[0] == 200, "the request it holds is answered"
        assert _post_json(url, _v2_body(np.zeros((1, 1), np.float32)))[0] == 200


def failing_on_big_values(x):
    if float(abs(x).max()) > 1e6:
        raise ValueError("secret-token-0451 leaked from /home/alice/model.py")
    return {"y": x}


def test_model_errors_are_500_without_the_model_text(client, cluster, caplog):
    model = PythonModel(_unique("fails"), failing_on_big_values, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    with (
        pipeline_of(client, model, partitions=1) as inbox,
        Gateway(cluster, {"fails": f"{inbox}:{model.name}"}, grpc_port=0, http_port=0) as gw,
    ):
        with caplog.at_level(logging.ERROR, logger="daskinfer.server.errors"):
            status, _, resp = _post_json(
                f"{gw.http_url}/v2/models/fails/infer", _v2_body(np.full((1, 1), 1e7, np.float32))
            )
        assert status == 500 and "secret" not in resp["error"] and "alice" not in resp["error"]
        error_id = re.search(r"error id ([0-9a-f]+)", resp["error"]).group(1)
        logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
        assert logged and "secret-token-0451" in logged[0]
        status, _, resp = _post_json(f"{gw.http_url}/v2/models/fails/infer", _v2_body(np.ones((1, 1), np.float32)))
        assert status == 200 and resp["outputs"][0]["data"] == [1.0]


def test_cli_gateway(cluster, mlp_inbox, mlp_path):
    from daskinfer.cli import main

    assert main(["gateway", "--scheduler", cluster.scheduler_address]) == 2  # no --pipeline
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "daskinfer.cli",
            "gateway",
            "--scheduler",
            cluster.scheduler_address,
            "--pipeline",
            "ghost=nowhere",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "daskinfer gateway: model 'ghost'" in bad.stderr and "is not deployed" in bad.stderr
    with serving(
        [
            "gateway",
            "--scheduler",
            cluster.scheduler_address,
            "--pipeline",
            f"mlp={mlp_inbox}:gw-mlp",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        "daskinfer gateway:",
    ) as (_, http_port):
        x = random_rows(4, seed=8)
        status, _, resp = _post_json(f"http://127.0.0.1:{http_port}/v2/models/mlp/infer", _v2_body(x))
        assert status == 200
        got = np.asarray(resp["outputs"][0]["data"], dtype=np.float32).reshape(4, 2)
        np.testing.assert_array_equal(got, run_onnx_directly(mlp_path, {"x": x})["probabilities"])
