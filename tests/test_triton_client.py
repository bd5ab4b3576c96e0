"""The official Triton client against ``daskinfer serve`` (ModelServer) and the gateway.

Both speak the KServe v2 protocol with Triton's extensions; these tests use
``tritonclient`` (HTTP and gRPC, binary tensor data and JSON, sync and async) exactly as
a Triton user would and compare every answer with onnxruntime run directly.  The
``ModelStreamInfer`` tests drive Triton's bidirectional stream with tritonclient's
``start_stream``/``async_stream_infer`` and with a raw ``grpc.aio`` stub (half-close, cancel).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
import uuid

import dask
import grpc
import numpy as np
import pytest
from optional import require
from timing import apoll, scaled

import daskinfer
from daskinfer import ModelServer, OnnxModel, Pipeline, PythonModel, deploy, deploy_pipeline, undeploy
from daskinfer.exceptions import ConfigError
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.testing import random_rows, run_onnx_directly

tritonclient = require("tritonclient", "tritonclient[all]")
import tritonclient.grpc as triton_grpc  # noqa: E402
import tritonclient.grpc.aio as triton_grpc_aio  # noqa: E402
import tritonclient.http as triton_http  # noqa: E402
import tritonclient.http.aio as triton_http_aio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


class Target:
    """Where a v2 server listens, and the model it serves."""

    def __init__(self, kind: str, http: str, grpc: str, model: str):
        self.kind, self.http, self.grpc, self.model = kind, http, grpc, model

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"


@pytest.fixture(scope="module")
def model_server(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, http_port=0) as s:
        yield Target("server", f"127.0.0.1:{s.http_port}", f"127.0.0.1:{s.grpc_port}", "mlp")


@pytest.fixture(scope="module")
def gateway(cluster, client, mlp_path):
    from daskinfer.server.gateway import Gateway

    name = f"triton-{uuid.uuid4().hex[:6]}"
    deploy(client, OnnxModel(name, mlp_path))
    handle = deploy_pipeline(client, Pipeline(model=name, inbox=f"{name}-in", partitions=2))
    try:
        with Gateway(cluster, {name: f"{name}-in"}, grpc_port=0, http_port=0) as gw:
            yield Target("gateway", f"127.0.0.1:{gw.http_port}", f"127.0.0.1:{gw.grpc_port}", name)
    finally:
        handle.stop()
        undeploy(client, name)


@pytest.fixture(params=["server", "gateway"])
def target(request) -> Target:
    return request.getfixturevalue("model_server" if request.param == "server" else "gateway")


def expected(mlp_path, x):
    return run_onnx_directly(mlp_path, {"x": x})["probabilities"]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_http_infer(target, mlp_path, binary_in, binary_out):
    x = random_rows(7, seed=11)
    with triton_http.InferenceServerClient(target.http) as tc:
        inp = triton_http.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary_in)
        out = triton_http.InferRequestedOutput("probabilities", binary_data=binary_out)
        result = tc.infer(target.model, [inp], outputs=[out], request_id="req-7")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(mlp_path, x), rtol=1e-6)
        assert result.get_response()["id"] == "req-7"
        # no outputs named: tritonclient asks for every output as binary data
        result = tc.infer(target.model, [inp])
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected(mlp_path, x))


def test_grpc_infer(target, mlp_path):
    x = random_rows(5, seed=12)
    with triton_grpc.InferenceServerClient(target.grpc) as tc:
        inp = triton_grpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = tc.infer(
            target.model, [inp], outputs=[triton_grpc.InferRequestedOutput("probabilities")], request_id="g-5"
        )
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected(mlp_path, x))
        assert result.get_response().id == "g-5"


def test_async_clients_many_calls_at_once(target, mlp_path):
    """Concurrent callers over both protocols each get their own rows back."""
    xs = [random_rows(i + 1, seed=100 + i) for i in range(8)]

    async def main():
        async with triton_http_aio.InferenceServerClient(target.http) as hc:
            hc_grpc = triton_grpc_aio.InferenceServerClient(target.grpc)
            try:
                calls = []
                for i, x in enumerate(xs):
                    if i % 2:
                        inp = triton_grpc_aio.InferInput("x", list(x.shape), "FP32")
                        inp.set_data_from_numpy(x)
                        calls.append(hc_grpc.infer(target.model, [inp]))
                    else:
                        inp = triton_http_aio.InferInput("x", list(x.shape), "FP32")
                        inp.set_data_from_numpy(x, binary_data=i % 4 == 0)
                        calls.append(hc.infer(target.model, [inp]))
                assert await hc.is_server_ready() and await hc_grpc.is_model_ready(target.model)
                return await asyncio.gather(*calls)
            finally:
                await hc_grpc.close()

    results = asyncio.run(main())
    for x, r in zip(xs, results):
        np.testing.assert_array_equal(r.as_numpy("probabilities"), expected(mlp_path, x))


def test_metadata_config_index_and_statistics(target):
    with triton_http.InferenceServerClient(target.http) as hc, triton_grpc.InferenceServerClient(target.grpc) as gc:
        gmd = gc.get_model_metadata(target.model, as_json=True)
        for t in gmd["inputs"] + gmd["outputs"]:
            t["shape"] = [int(d) for d in t["shape"]]  # protobuf's JSON writes int64 as strings
        for md in (hc.get_model_metadata(target.model), gmd):
            assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
            assert md["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
        config = hc.get_model_config(target.model)
        assert config["max_batch_size"] > 0 and config["platform"] == "onnxruntime_onnx"
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [16]}]
        assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]}]
        gconfig = gc.get_model_config(target.model, as_json=True)["config"]
        assert gconfig["input"][0]["dims"] == ["16"] and gconfig["output"][0]["data_type"] == "TYPE_FP32"
        index = hc.get_model_repository_index()
        assert {"name": target.model, "version": "1", "state": "READY", "reason": ""} in index
        gindex = gc.get_model_repository_index(as_json=True)["models"]
        assert any(m["name"] == target.model and m["state"] == "READY" for m in gindex)

        def inference_count() -> int:
            (stats,) = hc.get_inference_statistics(target.model)["model_stats"]
            (gstats,) = gc.get_inference_statistics(target.model, as_json=True)["model_stats"]
            assert int(gstats.get("inference_count", 0)) == stats["inference_count"]
            return stats["inference_count"]

        before = inference_count()
        x = random_rows(3, seed=1)
        inp = triton_http.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        hc.infer(target.model, [inp])
        assert inference_count() == before + 3
        all_stats = hc.get_inference_statistics()["model_stats"]
        assert target.model in {s["name"] for s in all_stats}


def test_errors_are_json_with_the_right_status(target):
    with triton_http.InferenceServerClient(target.http) as hc, triton_grpc.InferenceServerClient(target.grpc) as gc:
        with pytest.raises(InferenceServerException) as info:
            hc.get_model_config("no-such-model")
        assert info.value.status() == "404" and "'no-such-model'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            gc.get_model_config("no-such-model")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        x = random_rows(2).astype(np.float64)
        for client_module, tc, want in ((triton_http, hc, "400"), (triton_grpc, gc, "StatusCode.INVALID_ARGUMENT")):
            inp = client_module.InferInput("x", list(x.shape), "FP64")
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as info:
                tc.infer(target.model, [inp])
            assert info.value.status() == want and "float32" in info.value.message()
    for method, path, status in (
        ("GET", "/v2/no/such/route", 404),
        ("POST", "/v2/health/live", 405),
        ("GET", f"/v2/models/{target.model}/infer", 405),
    ):
        req = urllib.request.Request(target.http_url + path, method=method, data=b"" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == status
        assert info.value.headers["Content-Type"].startswith("application/json")
        assert path in json.loads(info.value.read())["error"]


# -- ModelStreamInfer: Triton's bidirectional stream ------------------------------------------


class StreamAnswers:
    """What a tritonclient stream callback received, by request id (errors by message)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: dict[str, list] = {}
        self.errors: list[str] = []

    def callback(self, result, error) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error.message())
            else:
                self.results.setdefault(result.get_response().id, []).append(result)

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.results.values()) + len(self.errors)


def _triton_input(x: np.ndarray, name: str = "x"):
    inp = triton_grpc.InferInput(name, list(x.shape), triton_grpc_dtype(x))
    inp.set_data_from_numpy(x)
    return inp


def triton_grpc_dtype(x: np.ndarray) -> str:
    return {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64"}[x.dtype]


def test_stream_infer_answers_every_request_once(target, mlp_path, poll):
    xs = [random_rows(1 + i % 4, seed=1000 + i) for i in range(200)]
    answers = StreamAnswers()
    with triton_grpc.InferenceServerClient(target.grpc) as tc:
        tc.start_stream(callback=answers.callback)
        try:
            for i, x in enumerate(xs):
                tc.async_stream_infer(target.model, [_triton_input(x)], request_id=f"s-{i}")
            poll(lambda: answers.count() >= len(xs), timeout=60, what="200 stream answers")
        finally:
            tc.stop_stream()
    assert answers.errors == []
    assert sorted(answers.results) == sorted(f"s-{i}" for i in range(len(xs)))
    for i, x in enumerate(xs):
        (result,) = answers.results[f"s-{i}"]  # exactly once
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(mlp_path, x), rtol=1e-6)


def test_stream_infer_answers_a_bad_request_with_its_error_and_goes_on(target, mlp_path, poll):
    bad = {
        5: ([_triton_input(random_rows(3)[:, :15].copy())], target.model, "[3, 15]"),  # wrong shape
        9: ([_triton_input(random_rows(2).astype(np.float64))], target.model, "float32"),  # wrong datatype
        13: ([_triton_input(random_rows(2))], "no-such-model", "'no-such-model'"),  # unknown model
    }
    xs = [random_rows(2, seed=2000 + i) for i in range(20)]
    answers = StreamAnswers()
    with triton_grpc.InferenceServerClient(target.grpc) as tc:
        tc.start_stream(callback=answers.callback)
        try:
            for i, x in enumerate(xs):
                inputs, model, _ = bad.get(i, ([_triton_input(x)], target.model, ""))
                tc.async_stream_infer(model, inputs, request_id=f"b-{i}")
            poll(lambda: answers.count() >= len(xs), timeout=60, what="20 stream answers")
        finally:
            tc.stop_stream()
    assert len(answers.errors) == len(bad)
    for i, (_, _, named) in bad.items():
        (message,) = [m for m in answers.errors if m.startswith(f"request 'b-{i}': ")]
        assert named in message, message
    assert sorted(answers.results) == sorted(f"b-{i}" for i in range(len(xs)) if i not in bad)
    for i, x in enumerate(xs):
        if i not in bad:
            (result,) = answers.results[f"b-{i}"]
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected(mlp_path, x), rtol=1e-6)


def _raw_request(model: str, x: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_stream_half_close_gets_every_pending_answer(target, mlp_path):
    """A grpc.aio caller writes all its requests, half-closes, then reads: every answer comes, then OK."""
    xs = [random_rows(1 + i % 3, seed=3000 + i) for i in range(50)]

    async def main() -> tuple[dict[str, pb.ModelStreamInferResponse], grpc.StatusCode]:
        async with grpc.aio.insecure_channel(target.grpc) as ch:
            call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(timeout=scaled(60))
            for i, x in enumerate(xs):
                await call.write(_raw_request(target.model, x, f"h-{i}"))
            await call.done_writing()
            got: dict[str, pb.ModelStreamInferResponse] = {}
            for _ in range(len(xs) + 1):  # the answers, then the end of the stream
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                assert resp.infer_response.id not in got, "answered twice"
                got[resp.infer_response.id] = resp
            return got, await call.code()

    got, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    assert sorted(got) == sorted(f"h-{i}" for i in range(len(xs)))
    for i, x in enumerate(xs):
        resp = got[f"h-{i}"]
        assert resp.error_message == "" and resp.infer_response.model_name == target.model
        out = resp.infer_response.outputs[0]
        y = np.frombuffer(resp.infer_response.raw_output_contents[0], np.float32).reshape(list(out.shape))
        np.testing.assert_allclose(y, expected(mlp_path, x), rtol=1e-6)


def test_stream_bytes_that_are_no_request_get_an_error_and_the_stream_goes_on(target, mlp_path):
    x = random_rows(2, seed=4000)
    good = [_raw_request(target.model, x, f"u-{i}").SerializeToString() for i in range(2)]

    async def main() -> list[pb.ModelStreamInferResponse]:
        async with grpc.aio.insecure_channel(target.grpc) as ch:
            method = ch.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=bytes,
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )
            call = method(iter([good[0], b"\x0a\xff", good[1]]), timeout=scaled(60))
            return [resp async for resp in call]

    answers = asyncio.run(main())
    assert len(answers) == 3
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and "not a valid ModelInferRequest message" in errors[0], errors
    assert sorted(a.infer_response.id for a in answers if not a.error_message) == ["u-0", "u-1"]


def test_stream_inflight_below_one_is_a_config_error(mlp_path):
    with pytest.raises(ConfigError, match="stream-inflight"):
        ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, serve_http=False, stream_inflight=0)


RELEASE = threading.Event()
"""Set to let :func:`wait_for_release` return."""


def wait_for_release(x):
    """A model that answers positive rows only once the test sets :data:`RELEASE` (or after a minute);
    others (the warm-up call at load) at once."""
    if x.size and float(x.max()) > 0:
        RELEASE.wait(scaled(60))
    return x


PACKAGE_DIR = os.path.dirname(os.path.abspath(daskinfer.__file__)) + os.sep


def _daskinfer_task(task: asyncio.Task) -> bool:
    """Whether ``task`` runs daskinfer's code (not grpc's own, not the test's)."""
    code = getattr(task.get_coro(), "cr_code", None)
    return not task.done() and code is not None and code.co_filename.startswith(PACKAGE_DIR)


def test_stream_inflight_is_bounded_and_cancel_leaves_nothing_running():
    """stream-inflight requests run at once; cancelling the stream cancels them, no task is left behind."""
    model = PythonModel("blocked", wait_for_release, inputs={"x": ("float32", (None, 1))}, outputs=["y"])
    x = np.ones((1, 1), np.float32)
    RELEASE.clear()

    async def main() -> None:
        with dask.config.set({"daskinfer.remote.server.stream-inflight": 3}):
            server = ModelServer(model, grpc_port=0, serve_http=False)
        async with server:
            assert server.stream_inflight == 3
            before = asyncio.all_tasks()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(timeout=scaled(60))
                for i in range(8):
                    await call.write(_raw_request("blocked", x, f"c-{i}"))
                await apoll(lambda: server.service.inflight == 3, what="3 stream requests in flight")
                assert server.service.inflight == 3, "no more than stream-inflight at once"
                assert {t for t in asyncio.all_tasks() if _daskinfer_task(t)} - before, "the stream runs tasks"
                call.cancel()
                # the model is still blocked: only cancelling them ends the calls
                await apoll(lambda: server.service.inflight == 0, what="the stream's requests to be cancelled")
            RELEASE.set()
            await apoll(
                lambda: not {t for t in asyncio.all_tasks() if _daskinfer_task(t)} - before,
                what="the stream's tasks (and the batches the model still runs) to end",
            )
            assert server.core.models()["blocked"].batcher.rows <= 3, "unread requests never ran"

    try:
        asyncio.run(main())
    finally:
        RELEASE.set()
