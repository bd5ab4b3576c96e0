"""Remote model clients against real servers on 127.0.0.1 that misbehave on purpose.

- an independent minimal TF-Serving-style REST server (aiohttp, written here) serving the
  bundled ONNX model: row and columnar formats equal local inference;
- fault servers for KServe v2 gRPC and REST that count the calls they receive: a bad request
  (400 / INVALID_ARGUMENT) is sent exactly once, an unavailable service (503 / UNAVAILABLE) is
  retried up to the limit, a slow one runs into the deadline, malformed answers (wrong row
  count, wrong dtype, garbage bytes) become clear errors, and the circuit breaker fails fast
  without calls reaching the server and closes again after a successful probe.

Each test runs its servers and its client in one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
from aiohttp import web

from daskinfer import RemoteModel
from daskinfer.exceptions import InputValidationError, ModelLoadError, RemoteModelError
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly

X = np.arange(12, dtype=np.float32).reshape(3, 4)


# -- a minimal TF-Serving-style REST server ------------------------------------------------------
class TFServing:
    """``/v1/models/mlp[/metadata|:predict]`` backed by onnxruntime, like TF Serving's REST API."""

    def __init__(self):
        import onnxruntime as ort

        self.session = ort.InferenceSession(bundled_model_path(), providers=["CPUExecutionProvider"])
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        tail = request.match_info["tail"]
        name, _, verb = tail.partition(":")
        name, _, sub = name.partition("/")
        if name != "mlp":
            return web.json_response({"error": f"Servable not found for request: Latest({name})"}, status=404)
        if request.method == "GET" and sub == "metadata":
            dims = lambda n: {"dim": [{"size": "-1", "name": ""}, {"size": str(n), "name": ""}]}  # noqa: E731
            sig = {
                "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": dims(16), "name": "serving_default_x:0"}},
                "outputs": {"probabilities": {"dtype": "DT_FLOAT", "tensor_shape": dims(2), "name": "Identity:0"}},
                "method_name": "tensorflow/serving/predict",
            }
            return web.json_response(
                {
                    "model_spec": {"name": "mlp", "signature_name": "", "version": "1"},
                    "metadata": {"signature_def": {"signature_def": {"serving_default": sig}}},
                }
            )
        if request.method == "POST" and verb == "predict":
            self.calls += 1
            body = await request.json()
            if "instances" in body:
                x = np.asarray(body["instances"], dtype=np.float32)
                (y,) = self.session.run(["probabilities"], {"x": x})
                return web.json_response({"predictions": y.tolist()})
            x = np.asarray(body["inputs"]["x"], dtype=np.float32)
            (y,) = self.session.run(["probabilities"], {"x": x})
            return web.json_response({"outputs": {"probabilities": y.tolist()}})
        return web.json_response({"error": "unknown request"}, status=400)


async def start_http(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_tfserving_rest_equals_local_inference(fmt):
    x = random_rows(700, seed=11)

    async def main():
        tf = TFServing()
        app = web.Application(client_max_size=2**24)
        app.router.add_route("*", "/v1/models/{tail:.*}", tf.handle)
        runner, port = await start_http(app)
        loaded = RemoteModel(
            "mlp", f"http://127.0.0.1:{port}", protocol="tfserving-rest", tfserving_format=fmt, max_batch_size=256
        ).load()
        try:
            out = await loaded.apredict(x)
            with pytest.raises(InputValidationError, match="expects shape"):
                await loaded.apredict(x[:, :3])  # checked against the signature, never sent
            return out, tf.calls, loaded
        finally:
            loaded.close()
            await runner.cleanup()

    out, calls, loaded = asyncio.run(main())
    assert calls == 3  # 700 rows in calls of at most 256
    assert out["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(
        out["probabilities"], run_onnx_directly(bundled_model_path(), {"x": x})["probabilities"]
    )
    assert [s.describe() for s in loaded.outputs] == ["probabilities: float32[N, 2]"]


# -- fault servers ----------------------------------------------------------------------------------
class Faults:
    """What the fault servers answer: ``mode`` for every call, counting calls per method.

    ``"slow"``: no answer until the test is over (``released``, set by :func:`run_against`).
    """

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.ready = True  # what ModelReady answers ("unimplemented": the call does not exist)
        self.calls: dict[str, int] = {}
        self.released: asyncio.Event | None = None

    def count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1


def _metadata_response() -> pb.ModelMetadataResponse:
    r = pb.ModelMetadataResponse(name="double", versions=["1"], platform="test")
    r.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    r.outputs.add(name="y", datatype="FP32", shape=[-1, 4])
    return r


async def start_fault_grpc(faults: Faults) -> tuple[grpc.aio.Server, int]:
    """A v2 gRPC server whose ModelInfer answers according to ``faults.mode``."""

    async def metadata(request, context):
        faults.count("ModelMetadata")
        return _metadata_response()

    async def ready(request, context):
        faults.count("ModelReady")
        if faults.ready == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return pb.ModelReadyResponse(ready=faults.ready)

    async def infer(request, context):
        faults.count("ModelInfer")
        mode = faults.mode
        if mode == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is not what I want")
        if mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded, come back later")
        if mode == "internal":
            await context.abort(grpc.StatusCode.INTERNAL, "backend crashed on this batch")
        if mode == "garbage":
            return b"\xff\xfe\x00 this is not a protobuf message \x07\x07"
        if mode == "slow":
            await faults.released.wait()
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(request.inputs[0].shape))
        y = x * 2
        resp = pb.ModelInferResponse(model_name="double", id=request.id)
        if mode == "rows":
            y = y[:-1]
        if mode == "dtype":
            y = y.astype(np.int64)
        out = resp.outputs.add(name="y", datatype="INT64" if mode == "dtype" else "FP32", shape=list(y.shape))
        resp.raw_output_contents.append(y.tobytes())
        assert out is not None
        return resp

    def ser(msg):
        return msg if isinstance(msg, bytes) else msg.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                metadata, request_deserializer=pb.ModelMetadataRequest.FromString, response_serializer=ser
            ),
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                ready, request_deserializer=pb.ModelReadyRequest.FromString, response_serializer=ser
            ),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=ser
            ),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def fault_rest_app(faults: Faults) -> web.Application:
    """A v2 REST server whose infer answers according to ``faults.mode``."""

    async def metadata(request):
        faults.count("ModelMetadata")
        t = lambda n: {"name": n, "datatype": "FP32", "shape": [-1, 4]}  # noqa: E731
        return web.json_response(
            {"name": "double", "versions": ["1"], "platform": "test", "inputs": [t("x")], "outputs": [t("y")]}
        )

    async def ready(request):
        faults.count("ModelReady")
        return web.json_response({"ready": bool(faults.ready)}, status=200 if faults.ready else 400)

    async def infer(request):
        faults.count("ModelInfer")
        mode = faults.mode
        if mode == "invalid":
            return web.json_response({"error": "input 'x' is not what I want"}, status=400)
        if mode == "unavailable":
            return web.json_response({"error": "overloaded, come back later"}, status=503)
        if mode == "internal":
            return web.json_response({"error": "backend crashed on this batch"}, status=500)
        if mode == "garbage":
            return web.Response(body=b"\xff\xfe\x00<html>oops", content_type="application/octet-stream")
        if mode == "slow":
            await faults.released.wait()
        body = await request.json()
        t = body["inputs"][0]
        y = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) * 2
        if mode == "rows":
            y = y[:-1]
        out = {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
        if mode == "dtype":
            out["data"] = ["a"] * y.size
        return web.json_response({"model_name": "double", "id": body.get("id"), "outputs": [out]})

    app = web.Application()
    app.router.add_get("/v2/models/double", metadata)
    app.router.add_get("/v2/models/double/ready", ready)
    app.router.add_post("/v2/models/double/infer", infer)
    return app


def run_against(protocol: str, faults: Faults, body, **model_kwargs):
    """Start the fault server of ``protocol``, load a RemoteModel on it, run ``body(loaded)``."""

    async def main():
        faults.released = asyncio.Event()
        if protocol == "kserve-grpc":
            server, port = await start_fault_grpc(faults)
            url = f"127.0.0.1:{port}"
        else:
            runner, port = await start_http(fault_rest_app(faults))
            url = f"http://127.0.0.1:{port}"
        kwargs = {"retries": 3, "backoff_base": 0.01, "backoff_max": 0.02, "timeout": 2, "deadline": 5, **model_kwargs}
        loaded = RemoteModel("double", url, protocol=protocol, **kwargs).load()
        try:
            return await body(loaded)
        finally:
            faults.released.set()
            loaded.close()
            if protocol == "kserve-grpc":
                await server.stop(0)
            else:
                await runner.cleanup()

    return asyncio.run(main())


PROTOCOLS = ["kserve-grpc", "kserve-rest"]


async def _outcome(coro):
    try:
        return await coro
    except RemoteModelError as e:
        return e


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fault_server_ok(protocol):
    faults = Faults("ok")

    async def body(loaded):
        return await loaded.apredict(X)

    out = run_against(protocol, faults, body)
    np.testing.assert_array_equal(out["y"], X * 2)
    assert faults.calls == {"ModelMetadata": 1, "ModelInfer": 1}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_retryable_error_is_sent_exactly_once(protocol):
    faults = Faults("invalid")

    async def body(loaded):
        return await _outcome(loaded.apredict(X))

    err = run_against(protocol, faults, body)
    assert isinstance(err, RemoteModelError) and not err.retryable
    assert faults.calls["ModelInfer"] == 1
    assert err.call == "ModelInfer" and err.service.startswith(("grpc://127.0.0.1:", "http://127.0.0.1:"))
    assert ("INVALID_ARGUMENT" if protocol == "kserve-grpc" else "HTTP 400") in str(err)
    assert "is not what I want" in str(err) and "'double'" in str(err)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retryable_error_is_retried_up_to_the_limit(protocol):
    faults = Faults("unavailable")

    async def body(loaded):
        return await _outcome(loaded.apredict(X)), loaded.stats

    err, stats = run_against(protocol, faults, body, retries=2, breaker_failures=100)
    assert isinstance(err, RemoteModelError) and err.retryable
    assert faults.calls["ModelInfer"] == 3  # the first attempt and two retries
    assert stats.retries == 2 and stats.attempts == 3
    assert "gave up after 3 attempts" in str(err)
    assert ("UNAVAILABLE" if protocol == "kserve-grpc" else "HTTP 503") in str(err)


@pytest.mark.parametrize("mode", ["unavailable", "internal"])  # an outage, a transient server error
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_retry_that_succeeds_answers_once(protocol, mode):
    faults = Faults(mode)

    async def body(loaded):
        await loaded.ensure_signature()
        task = asyncio.ensure_future(loaded.apredict(X))
        while faults.calls.get("ModelInfer", 0) < 1:
            await asyncio.sleep(0.001)
        faults.mode = "ok"
        return await task

    out = run_against(protocol, faults, body, retries=5, backoff_base=0.05, backoff_max=0.05)
    np.testing.assert_array_equal(out["y"], X * 2)
    assert faults.calls["ModelInfer"] == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_server_runs_into_the_deadline(protocol):
    faults = Faults("slow")

    async def body(loaded):
        await loaded.ensure_signature()
        t0 = time.monotonic()
        results = await asyncio.gather(*[_outcome(loaded.apredict(X, deadline=0.6)) for _ in range(4)])
        return results, time.monotonic() - t0

    # the server never answers: without the deadline, 51 attempts of 0.25 s each would take 13 s
    results, elapsed = run_against(protocol, faults, body, timeout=0.25, retries=50, breaker_failures=1000)
    assert all(isinstance(r, RemoteModelError) and r.retryable for r in results)
    assert elapsed < 0.6 + 2.0  # every request ended by its deadline (plus scheduling slack on a busy machine)
    assert any("deadline passed" in str(r) for r in results), [str(r) for r in results]
    assert any("no answer within" in str(r) or "DEADLINE_EXCEEDED" in str(r) for r in results)


MALFORMED = {
    ("kserve-grpc", "rows"): "output 'y' has 2 rows .* for a call of 3 rows",
    ("kserve-grpc", "dtype"): "output 'y' came back as int64, but the model's metadata declares float32",
    (
        "kserve-grpc",
        "garbage",
    ): (  # protobuf 7 | 6
        "ModelInfer failed: malformed response: 37 bytes that are not a inference.ModelInferResponse "
        ".*(Wire format was corrupt|Error parsing message)"
    ),
    ("kserve-rest", "rows"): "output 'y' has 2 rows .* for a call of 3 rows",
    ("kserve-rest", "dtype"): "tensor 'y' is declared FP32 but its data holds 'U'-kind values",
    ("kserve-rest", "garbage"): "malformed response: the body is not JSON",
}


@pytest.mark.parametrize("protocol,mode", sorted(MALFORMED))
def test_malformed_responses_become_clear_errors(protocol, mode):
    faults = Faults(mode)

    async def body(loaded):
        return await _outcome(loaded.apredict(X))

    err = run_against(protocol, faults, body)
    assert isinstance(err, RemoteModelError), err
    assert err.call == "ModelInfer" and err.service and not err.retryable
    assert faults.calls["ModelInfer"] == 1  # a malformed answer is not resent
    import re

    assert re.search(MALFORMED[(protocol, mode)], str(err)), str(err)


def test_tfserving_malformed_and_error_answers():
    answers = {
        "rows": ({"predictions": [[0.5, 0.5]]}, 200, "output 'probabilities' has 1 rows"),
        "dtype": ({"predictions": [["a", "b"], ["c", "d"]]}, 200, "declared FP32 but its data holds 'U'-kind"),
        "shape": ({"nothing": 1}, 200, "expected an object with 'predictions'"),
        "bad": ({"error": "Failed to process element: 0 of 'instances' list"}, 400, "HTTP 400: Failed to process"),
    }
    x = random_rows(2, seed=1)

    async def main():
        state = {"mode": "rows", "calls": 0}

        tf = TFServing()

        async def handle(request):
            if request.match_info["tail"].endswith("/metadata"):
                return await tf.handle(request)
            state["calls"] += 1
            body, status, _ = answers[state["mode"]]
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_route("*", "/v1/models/{tail:.*}", handle)
        runner, port = await start_http(app)
        loaded = RemoteModel(
            "mlp", f"http://127.0.0.1:{port}", protocol="tfserving-rest", retries=3, backoff_base=0.01
        ).load()
        out = {}
        try:
            for mode in answers:
                state["mode"], before = mode, state["calls"]
                out[mode] = (await _outcome(loaded.apredict(x)), state["calls"] - before)
        finally:
            loaded.close()
            await runner.cleanup()
        return out, loaded

    out, loaded = asyncio.run(main())
    for mode, (err, calls) in out.items():
        assert isinstance(err, RemoteModelError) and err.call == "Predict", (mode, err)
        assert answers[mode][2] in str(err), str(err)
        assert calls == 1 and not err.retryable


def test_tfserving_without_metadata_endpoint_checks_nothing():
    async def main():
        async def handle(request):
            if request.match_info["tail"].endswith("/metadata"):
                return web.json_response({"error": "not here"}, status=404)
            body = await request.json()
            return web.json_response({"predictions": [sum(r) for r in body["instances"]]})

        app = web.Application()
        app.router.add_route("*", "/v1/models/{tail:.*}", handle)
        runner, port = await start_http(app)
        loaded = RemoteModel("sum", f"http://127.0.0.1:{port}", protocol="tfserving-rest").load()
        try:
            return await loaded.apredict(X), loaded
        finally:
            loaded.close()
            await runner.cleanup()

    out, loaded = asyncio.run(main())
    assert loaded.inputs is None and loaded.outputs is None
    np.testing.assert_array_equal(out["output"], X.sum(axis=1))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_circuit_breaker_fails_fast_then_closes_after_a_probe(protocol):
    faults = Faults("unavailable")

    async def body(loaded):
        await loaded.ensure_signature()
        first = [await _outcome(loaded.apredict(X)) for _ in range(2)]
        reached = faults.calls["ModelInfer"]
        t0 = time.monotonic()
        fast = [await _outcome(loaded.apredict(X)) for _ in range(5)]
        fast_elapsed = time.monotonic() - t0
        after_open = faults.calls["ModelInfer"]
        faults.mode = "ok"
        # poll until the probe goes through (after breaker_reset), never a fixed sleep
        deadline = time.monotonic() + 5
        while True:
            r = await _outcome(loaded.apredict(X))
            if not isinstance(r, RemoteModelError):
                break
            assert "circuit is open" in str(r)
            assert time.monotonic() < deadline, "the circuit never closed"
            await asyncio.sleep(0.02)
        probe_calls = faults.calls["ModelInfer"] - after_open
        again = await loaded.apredict(X)
        return first, reached, fast, fast_elapsed, after_open, r, probe_calls, again, loaded.breaker

    first, reached, fast, fast_elapsed, after_open, probe, probe_calls, again, breaker = run_against(
        protocol, faults, body, retries=0, breaker_failures=2, breaker_reset=0.3
    )
    assert all(isinstance(e, RemoteModelError) for e in first) and reached == 2
    assert all(isinstance(e, RemoteModelError) and "circuit is open" in str(e) for e in fast)
    assert after_open == reached  # failing fast: no call reached the server
    assert fast_elapsed < 0.2
    assert fast[0].call == "ModelInfer" and "next probe in" in str(fast[0])
    np.testing.assert_array_equal(probe["y"], X * 2)
    assert probe_calls == 1  # exactly one probe, and it closed the circuit
    np.testing.assert_array_equal(again["y"], X * 2)
    assert breaker.state == "closed" and breaker.times_opened == 1


def test_inputs_are_checked_before_anything_is_sent():
    faults = Faults("ok")

    async def body(loaded):
        with pytest.raises(InputValidationError, match="expects shape"):
            await loaded.apredict(np.zeros((2, 5), dtype=np.float32))
        with pytest.raises(InputValidationError, match="missing input 'x'"):
            await loaded.apredict({"z": X, "w": X})
        np.testing.assert_array_equal((await loaded.apredict({"z": X}))["y"], X * 2)  # its one input, by any name

    run_against("kserve-grpc", faults, body)
    assert faults.calls == {"ModelMetadata": 1, "ModelInfer": 1}


def test_bounded_inflight_calls_and_row_order():
    faults = Faults("ok")
    seen = {"now": 0, "max": 0}

    async def body(loaded):
        await loaded.ensure_signature()
        x = np.arange(4 * 50, dtype=np.float32).reshape(50, 4)
        return x, await loaded.apredict(x)

    # wrap the client of this loop to measure concurrency
    async def wrapped(loaded):
        st = await loaded._state()
        orig = st.client.infer

        async def infer(block, timeout, request_id=""):
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            try:
                await asyncio.sleep(0.01)
                return await orig(block, timeout, request_id)
            finally:
                seen["now"] -= 1

        st.client.infer = infer
        return await body(loaded)

    x, out = run_against("kserve-grpc", faults, wrapped, max_batch_size=4, max_inflight=3)
    np.testing.assert_array_equal(out["y"], x * 2)  # 13 calls reassembled in order
    assert faults.calls["ModelInfer"] == 13 and seen["max"] == 3


def test_remote_model_spec_is_small_and_checked(tmp_path):
    import pickle

    from daskinfer.exceptions import ConfigError

    m = RemoteModel("m", "127.0.0.1:1", max_batch_size=7, timeout="150ms")
    assert m.kind == "remote" and m.timeout == pytest.approx(0.15) and m.max_batch_size == 7
    assert len(pickle.dumps(m)) < 2000
    with pytest.raises(ConfigError, match="protocol must be one of"):
        RemoteModel("m", "127.0.0.1:1", protocol="soap")
    with pytest.raises(ConfigError, match="needs an http"):
        RemoteModel("m", "127.0.0.1:1", protocol="kserve-rest")
    with pytest.raises(ConfigError, match="cannot read tls_ca"):
        RemoteModel("m", "127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))


def test_sync_predict_from_a_plain_thread():
    """``predict`` (what a Dask task thread calls) runs on the model's private loop."""
    import threading

    faults = Faults("ok")
    result = {}

    async def main():
        server, port = await start_fault_grpc(faults)
        loaded = RemoteModel("double", f"127.0.0.1:{port}").load()

        def work():
            result["out"] = loaded.predict(X)

        t = threading.Thread(target=work)
        t.start()
        await asyncio.to_thread(t.join, 30)
        loaded.close()
        await server.stop(0)
        return loaded

    loaded = asyncio.run(main())
    np.testing.assert_array_equal(result["out"]["y"], X * 2)
    assert loaded._private is None  # closed with the model
    assert json.dumps(faults.calls) == json.dumps({"ModelMetadata": 1, "ModelInfer": 1})


# -- what counts against the service: server errors and bad answers, never a refused request ------
SERVER_ERROR = {
    "kserve-grpc": "INTERNAL: backend crashed on this batch",
    "kserve-rest": "HTTP 500: backend crashed on this batch",
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_error_is_retried_a_bounded_number_of_times(protocol):
    faults = Faults("internal")

    async def body(loaded):
        return await _outcome(loaded.apredict(X))

    err = run_against(protocol, faults, body, retries=3, server_error_retries=1, breaker_failures=100)
    assert isinstance(err, RemoteModelError) and err.fault == "server" and err.retryable
    assert faults.calls["ModelInfer"] == 2  # one retry, however many the policy allows for an outage
    assert SERVER_ERROR[protocol] in str(err) and "gave up after 2 attempts" in str(err)


@pytest.mark.parametrize("mode", ["internal", "garbage"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_service_that_keeps_failing_opens_the_breaker(protocol, mode):
    faults = Faults(mode)

    async def body(loaded):
        await loaded.ensure_signature()
        return [await _outcome(loaded.apredict(X)) for _ in range(20)], loaded.breaker

    errors, breaker = run_against(
        protocol, faults, body, retries=3, server_error_retries=1, breaker_failures=3, breaker_reset=60
    )
    assert all(isinstance(e, RemoteModelError) for e in errors)
    assert breaker.state == "open" and breaker.times_opened == 1
    assert faults.calls["ModelInfer"] == 3  # then every call failed fast, without reaching the service
    assert all("circuit is open" in str(e) for e in errors[-15:])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_request_is_no_success_for_the_breaker(protocol):
    faults = Faults("unavailable")

    async def body(loaded):
        await loaded.ensure_signature()
        await _outcome(loaded.apredict(X))  # 2 failed attempts
        faults.mode = "invalid"
        refused = await _outcome(loaded.apredict(X))  # the service is up, but says nothing of its health
        faults.mode = "unavailable"
        await _outcome(loaded.apredict(X))  # the third consecutive failure opens the circuit
        return refused, loaded.breaker

    refused, breaker = run_against(protocol, faults, body, retries=1, breaker_failures=3, breaker_reset=60)
    assert isinstance(refused, RemoteModelError) and refused.fault == "request" and not refused.retryable
    assert breaker.state == "open"
    assert faults.calls["ModelInfer"] == 4  # 2 + 1 + 1: the last call's retry was refused by the open circuit


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_probe_frees_the_half_open_circuit_for_the_next_probe(protocol):
    faults = Faults("unavailable")

    async def body(loaded):
        await loaded.ensure_signature()
        await _outcome(loaded.apredict(X))
        assert loaded.breaker.state == "open"
        faults.mode = "invalid"
        deadline = time.monotonic() + 5
        while True:  # poll until the probe goes through (after breaker_reset)
            probe = await _outcome(loaded.apredict(X))
            if "circuit is open" not in str(probe):
                break
            assert time.monotonic() < deadline, "no probe was let through"
            await asyncio.sleep(0.02)
        faults.mode = "ok"
        return probe, await loaded.apredict(X), loaded.breaker

    probe, out, breaker = run_against(protocol, faults, body, retries=0, breaker_failures=1, breaker_reset=0.2)
    assert isinstance(probe, RemoteModelError) and probe.fault == "request"
    np.testing.assert_array_equal(out["y"], X * 2)  # the next call was the next probe, and it closed the circuit
    assert breaker.state == "closed"


# -- what deploy checks on the client: the service answers --------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_deploy_check_asks_whether_the_model_is_ready_and_reads_its_metadata(protocol):
    faults = Faults("ok")

    async def body(loaded):
        await loaded.acheck_service()
        return loaded

    loaded = run_against(protocol, faults, body)
    assert faults.calls == {"ModelReady": 1, "ModelMetadata": 1}
    assert [s.describe() for s in loaded.inputs] == ["x: float32[N, 4]"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_deploy_check_says_when_the_model_is_not_ready(protocol):
    faults = Faults("ok")
    faults.ready = False

    async def body(loaded):
        with pytest.raises(
            ModelLoadError, match=r"answers, but says model 'double' is not ready or not known there"
        ) as info:
            await loaded.acheck_service()
        return info.value

    err = run_against(protocol, faults, body)
    assert err.path.startswith(("127.0.0.1:", "http://127.0.0.1:")) and err.path in str(err)
    assert "ModelMetadata" not in faults.calls


def test_the_deploy_check_reads_the_metadata_of_a_service_without_model_readiness():
    faults = Faults("ok")
    faults.ready = "unimplemented"

    async def body(loaded):
        await loaded.acheck_service()

    run_against("kserve-grpc", faults, body)
    assert faults.calls == {"ModelReady": 1, "ModelMetadata": 1}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_deploy_check_refuses_outputs_the_model_lacks(protocol):
    async def body(loaded):
        with pytest.raises(
            ModelLoadError, match=r"model 'double' has no output 'z' asked for by outputs=; its outputs: \['y'\]"
        ):
            await loaded.acheck_service()

    run_against(protocol, Faults("ok"), body, outputs=["z"])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deploying_a_remote_model_nobody_serves_fails_naming_the_url(protocol):
    port = _closed_port()
    url = f"127.0.0.1:{port}" if protocol == "kserve-grpc" else f"http://127.0.0.1:{port}"
    model = RemoteModel("ghost", url, protocol=protocol, timeout=2)
    with pytest.raises(
        ModelLoadError, match=r"remote model 'ghost': the service at .*127\.0\.0\.1:\d+ .* did not answer"
    ) as info:
        model.validate()
    assert f"127.0.0.1:{port}" in str(info.value) and "validate=False" in str(info.value)
