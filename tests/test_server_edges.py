"""The model server's edges (issue 10 item 7, issue 14 items 3 and 4).

- TLS and mutual TLS hold on the REST port too: with ``--tls-client-ca`` no port
  answers a caller without a client certificate.
- A limit on concurrent calls: more get 503 / RESOURCE_EXHAUSTED with Retry-After.
- A model's exception text never reaches the network caller: a generic message with an
  error id, and the full text in the server log under that id.
- ``daskinfer serve`` works on the base install (aiohttp is a core dependency), a port
  in use (gRPC or REST) is a one-line error, not a shared port or a traceback.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.metadata
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from daskinfer import ModelServer, OnnxModel, PythonModel
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.errors import ServerBindError


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args[:2])} failed: {proc.stderr[-300:]!r}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("no openssl tool to make test certificates; CI is set, so this is a failure", pytrace=False)
        pytest.skip("no openssl tool to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
        "-days",
        "1",
        "-subj",
        "/CN=daskinfer-test-ca",
    )
    for who, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "subjectAltName=DNS:client")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(d / f"{who}.key"),
            "-out",
            str(d / f"{who}.csr"),
            "-subj",
            f"/CN={who}",
        )
        (d / f"{who}.ext").write_text(san + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{who}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(d / f"{who}.pem"),
            "-days",
            "1",
            "-extfile",
            str(d / f"{who}.ext"),
        )
    return d


def _https_get(url: str, ca: str, cert: tuple[str, str] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
        return r.status


def test_mutual_tls_holds_on_rest_and_grpc(pki, mlp_path):
    with ModelServer(
        OnnxModel("mlp", mlp_path),
        grpc_port=0,
        http_port=0,
        host="127.0.0.1",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    ) as s:
        assert s.http_url.startswith("https://127.0.0.1:")
        ready = s.http_url + "/v2/health/ready"
        client_cert = (str(pki / "client.pem"), str(pki / "client.key"))
        assert _https_get(ready, str(pki / "ca.pem"), client_cert) == 200
        # plaintext HTTP on the REST port gets no answer
        conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            conn.request("GET", "/v2/health/ready")
            conn.getresponse()
        conn.close()
        # TLS without a client certificate is refused
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _https_get(ready, str(pki / "ca.pem"))
        # gRPC: the same rules
        ca = (pki / "ca.pem").read_bytes()
        target = f"127.0.0.1:{s.grpc_port}"
        mtls = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        with grpc.secure_channel(target, mtls) as ch:
            assert pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=5)


def _post(url: str, x: np.ndarray) -> tuple[int, dict, dict]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def sleep_for_max(x):
    if x.size and float(x.max()) > 0:
        time.sleep(float(x.max()))
    return x


def test_concurrent_calls_are_limited(mlp_path, poll):
    model = PythonModel("sleepy", sleep_for_max, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    with ModelServer(model, grpc_port=0, http_port=0, max_concurrent_calls=1) as s:
        url = s.http_url + "/v2/models/sleepy/infer"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, url, np.full((1, 1), 2.0, np.float32))
            poll(lambda: s.service.inflight == 1, what="the slow call to be in flight")
            status, headers, resp = _post(url, np.zeros((1, 1), np.float32))
            assert status == 503 and headers["Retry-After"] == "1" and "limit 1" in resp["error"]
            with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
                req = pb.ModelInferRequest(model_name="sleepy")
                req.inputs.add(name="x", datatype="FP32", shape=[1, 1])
                req.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert first.result(30)[0] == 200
        assert _post(url, np.zeros((1, 1), np.float32))[0] == 200, "the slot is free again"


def leaky(x):
    if x.size and float(x.max()) > 1e6:
        raise RuntimeError("cannot open /srv/secret/api-token-7f3a for the model")
    return x


def test_model_exception_text_stays_in_the_log(caplog):
    model = PythonModel("leaky", leaky, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    big = np.full((1, 1), 1e7, np.float32)
    with ModelServer(model, grpc_port=0, http_port=0) as s, caplog.at_level(logging.ERROR, logger="daskinfer.server"):
        status, _, resp = _post(s.http_url + "/v2/models/leaky/infer", big)
        assert status == 500 and "secret" not in resp["error"] and "RuntimeError" not in resp["error"]
        assert "model 'leaky' failed" in resp["error"]
        rest_id = re.search(r"error id ([0-9a-f]+)", resp["error"]).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
            req = pb.ModelInferRequest(model_name="leaky")
            req.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            req.raw_input_contents.append(big.tobytes())
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
        grpc_id = re.search(r"error id ([0-9a-f]+)", info.value.details()).group(1)
    assert rest_id != grpc_id
    for error_id in (rest_id, grpc_id):
        logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
        assert logged and "api-token-7f3a" in logged[0] and "RuntimeError" in logged[0]


def test_base_install_has_what_serve_needs():
    """REST is on by default, so its dependency is a core one (not an extra the README never names)."""
    core = [r for r in importlib.metadata.requires("daskinfer") or [] if "extra ==" not in r]
    assert any(re.match(r"aiohttp\b", r) for r in core), core


def test_ports_in_use_are_refused(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, http_port=0) as first:
        second = ModelServer(OnnxModel("mlp", mlp_path), grpc_port=first.grpc_port, serve_http=False)
        with pytest.raises(ServerBindError, match=f"gRPC front end to 127.0.0.1:{first.grpc_port}"):
            second.start()
        third = ModelServer(OnnxModel("mlp", mlp_path), http_port=first.http_port, serve_grpc=False)
        with pytest.raises(ServerBindError, match=f"REST front end to 127.0.0.1:{first.http_port}: the port is in use"):
            third.start()
        assert not second.running and not third.running
        assert asyncio.run(_ready(first.http_url)), "the first server still answers"


async def _ready(url: str) -> bool:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url + "/v2/health/ready") as r:
        return r.status == 200


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daskinfer.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_serve_errors_are_one_clean_line(mlp_path, tmp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, http_port=0) as running:
        cases = {
            "grpc": _serve("--onnx", f"mlp={mlp_path}", "--no-http", "--grpc-port", str(running.grpc_port)),
            "rest": _serve("--onnx", f"mlp={mlp_path}", "--no-grpc", "--http-port", str(running.http_port)),
        }
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    cases["model"] = _serve("--onnx", f"mlp={tmp_path / 'broken.onnx'}", "--grpc-port", "0", "--http-port", "0")
    expected = {
        "grpc": f"daskinfer serve: cannot bind the gRPC front end to 127.0.0.1:{running.grpc_port}",
        "rest": f"daskinfer serve: cannot bind the REST front end to 127.0.0.1:{running.http_port}",
        "model": "daskinfer serve: ",
    }
    for case, proc in cases.items():
        assert proc.returncode in (1, 2), (case, proc.stderr)
        assert "Traceback" not in proc.stderr, (case, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(expected[case]), (case, proc.stderr)
    assert "broken.onnx" in cases["model"].stderr.strip().splitlines()[-1]


def test_oversized_body_is_a_json_413(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), serve_grpc=False, http_port=0, max_message_size="1KiB") as s:
        x = np.zeros((64, 16), np.float32)  # 4 KiB of raw data, more as JSON
        status, _, resp = _post(s.http_url + "/v2/models/mlp/infer", x)
    assert status == 413 and "1024" in resp["error"]
