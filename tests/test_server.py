"""The daskinfer model server: KServe v2 over gRPC and REST, on 127.0.0.1 with free ports.

Its answers equal local inference, it batches concurrent callers, it tells bad requests
and unknown models apart, and ``daskinfer serve`` runs it from the command line.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from cli_process import serving

from daskinfer import ModelServer, OnnxModel, PythonModel, RemoteModel
from daskinfer.exceptions import InputValidationError, RemoteModelError
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.testing import random_rows, run_onnx_directly


def double(x):
    return x * 2


@pytest.fixture(scope="module")
def server(mlp_path):
    models = [
        OnnxModel("mlp", mlp_path),
        PythonModel("double", double, inputs={"x": ("float32", (None, 4))}, outputs=["y"]),
    ]
    with ModelServer(models, grpc_port=0, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address.removeprefix("grpc://")) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_binds_loopback_by_default(server):
    """The sockets the server (made without ``host``) listens on are bound to 127.0.0.1 only."""
    import ipaddress

    import psutil

    ports = {int(server.grpc_address.rsplit(":", 1)[1]), int(server.http_url.rsplit(":", 1)[1])}
    proc = psutil.Process()
    conns = proc.net_connections("inet") if hasattr(proc, "net_connections") else proc.connections("inet")
    listening = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port in ports}
    assert {port for _, port in listening} == ports

    def loopback(ip: str) -> bool:  # gRPC listens on a dual-stack socket: ::ffff:127.0.0.1
        addr = ipaddress.ip_address(ip)
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    assert all(loopback(ip) for ip, _ in listening), listening  # not 0.0.0.0 / ::


@pytest.mark.parametrize("protocol", ["kserve-grpc", "kserve-rest"])
def test_remote_model_equals_local_inference(server, mlp_path, protocol):
    url = server.grpc_address if protocol == "kserve-grpc" else server.http_url
    loaded = RemoteModel("mlp", url, protocol=protocol, max_batch_size=1000).load()
    try:
        x = random_rows(2500, seed=3)  # three calls of at most 1000 rows
        out = loaded.predict(x)
        np.testing.assert_array_equal(out["probabilities"], run_onnx_directly(mlp_path, {"x": x})["probabilities"])
        assert loaded.stats.calls == 3 and loaded.stats.rows == 2500
        assert [s.describe() for s in loaded.inputs] == ["x: float32[N, 16]"]
        with pytest.raises(InputValidationError, match="float32"):
            loaded.predict(x.astype(np.float64))  # checked against the metadata, never sent
        assert loaded.stats.calls == 3
    finally:
        loaded.close()


def test_python_model_over_grpc(server):
    loaded = RemoteModel("double", server.grpc_address).load()
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(loaded.predict(x)["y"], x * 2)
    finally:
        loaded.close()


def test_health_and_metadata_over_rest(server):
    assert _get(server.http_url + "/v2/health/live") == (200, {"live": True})
    assert _get(server.http_url + "/v2/health/ready") == (200, {"ready": True})
    assert _get(server.http_url + "/v2/models/mlp/ready")[0] == 200
    status, md = _get(server.http_url + "/v2/models/mlp")
    assert status == 200
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert md["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert md["platform"] == "onnxruntime_onnx" and md["versions"] == ["1"]
    status, err = _get(server.http_url + "/v2/models/nope")
    assert status == 404 and "'nope'" in err["error"] and "mlp" in err["error"]
    assert _get(server.http_url + "/v2/models/mlp/versions/7")[0] == 404


def test_rest_infer_plain_json(server, mlp_path):
    x = random_rows(3, seed=5)
    body = {"id": "r1", "inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, resp = _post(server.http_url + "/v2/models/mlp/infer", json.dumps(body).encode())
    assert status == 200 and resp["id"] == "r1" and resp["model_name"] == "mlp"
    (out,) = resp["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [3, 2] and out["datatype"] == "FP32"
    np.testing.assert_array_equal(
        np.asarray(out["data"], dtype=np.float32).reshape(3, 2), run_onnx_directly(mlp_path, {"x": x})["probabilities"]
    )


def test_rest_bad_requests(server):
    url = server.http_url + "/v2/models/mlp/infer"
    status, err = _post(url, b"{not json")
    assert status == 400 and "not JSON" in err["error"]
    bad_shape = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [1.0] * 5}]}
    status, err = _post(url, json.dumps(bad_shape).encode())
    assert status == 400 and "needs 32 values, got 5" in err["error"]
    wrong_dtype = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP64", "data": [1.0] * 16}]}
    status, err = _post(url, json.dumps(wrong_dtype).encode())
    assert status == 400 and "expects dtype float32" in err["error"]
    status, err = _post(server.http_url + "/v2/models/nope/infer", json.dumps(wrong_dtype).encode())
    assert status == 404


def test_grpc_health_metadata_and_typed_contents(server, stub, mlp_path):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
    assert (md.inputs[0].name, md.inputs[0].datatype, list(md.inputs[0].shape)) == ("x", "FP32", [-1, 16])
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "daskinfer"
    # a client that sends typed contents instead of raw bytes (as some Triton clients do)
    x = random_rows(5, seed=9)
    req = pb.ModelInferRequest(model_name="mlp", id="typed")
    t = req.inputs.add(name="x", datatype="FP32", shape=[5, 16])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req)
    assert resp.id == "typed" and resp.outputs[0].name == "probabilities"
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(5, 2)
    np.testing.assert_array_equal(got, run_onnx_directly(mlp_path, {"x": x})["probabilities"])


def test_grpc_bad_requests(stub):
    x = random_rows(2, seed=1).astype(np.float64)
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP64", shape=[2, 16])
    req.raw_input_contents.append(x.tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "float32" in info.value.details()
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    req.raw_input_contents.append(b"\x00" * 7)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 128 bytes, got 7" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def slow_double(x):
    time.sleep(0.02)  # a model call long enough for the other callers to queue up behind it
    return x * 2


def test_concurrent_callers_are_batched_together():
    model = PythonModel("slow", slow_double, inputs={"x": ("float32", (None, 4))}, outputs=["y"])
    xs = [np.full((1, 4), i, dtype=np.float32) for i in range(64)]

    async def main():
        async with ModelServer(model, grpc_port=0, serve_http=False, max_inflight=1) as server:
            loaded = RemoteModel("slow", server.grpc_address, max_inflight=64).load()
            try:
                outs = await asyncio.gather(*[loaded.apredict(x) for x in xs])
            finally:
                loaded.close()
            batcher = server.core.models()["slow"].batcher
            return outs, batcher.batches, batcher.rows

    outs, batches, rows = asyncio.run(main())
    for x, o in zip(xs, outs):  # each caller got its own rows back
        np.testing.assert_array_equal(o["y"], x * 2)
    assert rows == 64
    assert batches <= 16  # callers shared model calls (64 calls of one row each)


def test_remote_error_names_service_and_call(server):
    loaded = RemoteModel("nope", server.grpc_address, retries=0).load()
    try:
        with pytest.raises(RemoteModelError) as info:
            loaded.predict(random_rows(1))
    finally:
        loaded.close()
    e = info.value
    assert e.service == server.grpc_address and e.call == "ModelMetadata" and not e.retryable
    assert "NOT_FOUND" in str(e) and "'nope'" in str(e)


def _tls_material(tmp_path):
    """A self-signed certificate for 127.0.0.1 made with the openssl tool."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    proc = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {proc.stderr[-200:]!r}")
    return key, cert


def test_grpc_over_tls(tmp_path, mlp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl tool to make a test certificate")
    key, cert = _tls_material(tmp_path)
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, serve_http=False, tls_cert=cert, tls_key=key) as s:
        assert s.grpc_address.startswith("grpcs://127.0.0.1:")
        loaded = RemoteModel("mlp", s.grpc_address, tls_ca=cert).load()
        try:
            x = random_rows(4, seed=2)
            np.testing.assert_array_equal(
                loaded.predict(x)["probabilities"], run_onnx_directly(mlp_path, {"x": x})["probabilities"]
            )
        finally:
            loaded.close()
        plain = RemoteModel("mlp", s.grpc_address.replace("grpcs://", "grpc://"), retries=0, deadline=2).load()
        try:
            with pytest.raises(RemoteModelError):
                plain.predict(random_rows(1))
        finally:
            plain.close()


def test_cli_serve(mlp_path, poll):
    from daskinfer.cli import main

    assert main(["serve", "--onnx", "no-equals-sign"]) == 2
    assert main(["serve"]) == 2  # nothing to serve
    with serving(
        ["serve", "--onnx", f"mlp={mlp_path}", "--grpc-port", "0", "--http-port", "0"], "daskinfer model server"
    ) as (grpc_port, http_port):
        assert _get(f"http://127.0.0.1:{http_port}/v2/health/ready")[0] == 200
        loaded = RemoteModel("mlp", f"127.0.0.1:{grpc_port}").load()
        try:
            x = random_rows(10, seed=4)
            np.testing.assert_array_equal(
                loaded.predict(x)["probabilities"], run_onnx_directly(mlp_path, {"x": x})["probabilities"]
            )
        finally:
            loaded.close()
