"""The gateway tells the truth about the pipelines behind it, under a strict client.

Its v2 metadata describes the pipeline (the inputs its first stages read, the outputs of its
last stage), saying so where the stages do not tell; a request the caller got wrong (a
filter's refusal, an input a stage cannot take) is 400 / INVALID_ARGUMENT with the reason,
a fault of the pipeline 500 with an error id; its JSON is strict both ways; a one-input
pipeline takes its input under any name.  Real pipelines on the session LocalCluster, real
servers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
import uuid

import grpc
import numpy as np
import pytest

from daskinfer import Pipeline, deploy_pipeline
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.gateway import Gateway
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = pytest.mark.timeout(120)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes | dict) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _strict(body: bytes) -> dict:
    """Parse as a strict JSON parser does (Go's encoding/json, Jackson by default): no NaN, no Infinity."""

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


def _body(x: np.ndarray, name: str = "x", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}


def finite_rows(c):
    return np.isfinite(c["x"]).all(axis=1) & (np.abs(c["x"]).max(axis=1) < 50)


def prep(c):
    x = c["x"]
    if x.shape[1] != 16:
        raise ValueError(f"a row needs 16 features, got {x.shape[1]}")
    return {"x": (x - 0.5) / 2.0}


def post(c):
    p = c["probabilities"]
    return {"label": p.argmax(axis=1).astype(np.int64), "p1": p[:, 1].astype(np.float64)}


def broken_post(c):
    return {"label": c["probabilities"].argmax(axis=1) + None}  # TypeError: a fault of the pipeline


def nan_post(c):
    p1 = c["probabilities"][:, 1].astype(np.float64)
    return {"p1": np.where(c["x"][:, 0] > 0.5, np.nan, p1)}


@contextlib.contextmanager
def gateway_for(client, cluster, pipe: Pipeline, model: str | None = "mlp"):
    """A gateway with the v2 name "scores" in front of ``pipe`` (``scores=INBOX:MODEL``, or ``scores=INBOX``)."""
    handle = deploy_pipeline(client, pipe)
    try:
        route = f"scores={pipe.inbox}" + (f":{model}" if model else "")
        with Gateway(cluster, [route], grpc_port=0, http_port=0) as gw:
            yield gw
    finally:
        handle.stop()


def _inbox() -> str:
    return f"truth-{uuid.uuid4().hex[:6]}"


def _tensors(meta: dict, side: str) -> dict:
    return {t["name"]: (t["datatype"], t["shape"]) for t in meta[side]}


def test_metadata_describes_the_pipeline_not_its_model(client, cluster, mlp_deployed, mlp_path):
    pipe = (
        Pipeline(inbox=_inbox(), partitions=1)
        .filter(finite_rows, reason="rows must be finite and within 50")
        .map_batches(prep, name="prep")
        .infer(mlp_deployed)
        .map_batches(post, name="post")
    )
    with gateway_for(client, cluster, pipe) as gw:
        url = f"{gw.http_url}/v2/models/scores"
        meta = _get(url)
        # the stages do not tell: say so, do not show the model's tensors as the pipeline's
        assert meta["inputs"] == [] and meta["outputs"] == [], meta
        assert "map_batches 'prep'" in meta["parameters"]["inputs"] and "not known" in meta["parameters"]["inputs"]
        assert "map_batches 'post'" in meta["parameters"]["outputs"]
        assert meta["platform"] == "daskinfer_pipeline"
        x = random_rows(3, seed=3)
        status, body = _post(f"{url}/infer", _body(x))
        assert status == 200, body
        reply = _strict(body)
        assert {o["name"]: o["datatype"] for o in reply["outputs"]} == {"label": "INT64", "p1": "FP64"}
        meta = _get(url)  # now it has seen answers: their tensors, marked as seen
        assert _tensors(meta, "outputs") == {"label": ("INT64", [-1]), "p1": ("FP64", [-1])}
        assert _tensors(meta, "inputs") == {"x": ("FP32", [-1, 16])}
        assert meta["parameters"]["outputs"].startswith("seen in answered requests")
        want = run_onnx_directly(mlp_path, {"x": (x - 0.5) / 2.0})["probabilities"]
        assert [o for o in reply["outputs"] if o["name"] == "label"][0]["data"] == want.argmax(axis=1).tolist()
        with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
            gmeta = pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="scores"))
        assert {t.name: t.datatype for t in gmeta.outputs} == {"label": "INT64", "p1": "FP64"}


def test_metadata_of_a_model_stage_under_mapped_columns(client, cluster, mlp_deployed):
    pipe = (
        Pipeline(inbox=_inbox(), partitions=1)
        .filter(lambda c: np.isfinite(c["features"]).all(axis=1))
        .infer(mlp_deployed, inputs={"x": "features"})
        .to_topic(f"copies-{uuid.uuid4().hex[:6]}")
    )
    with gateway_for(client, cluster, pipe, model=None) as gw:  # the v2 name needs no model of its name
        meta = _get(f"{gw.http_url}/v2/models/scores")
        assert _tensors(meta, "inputs") == {"features": ("FP32", [-1, 16])}, meta
        assert _tensors(meta, "outputs") == {"probabilities": ("FP32", [-1, 2])}
        assert "model 'mlp'" in meta["parameters"]["inputs"]
        config = _get(f"{gw.http_url}/v2/models/scores/config")
        assert [i["name"] for i in config["input"]] == ["features"]
        # a one-input pipeline takes its input under any name, as the Python client does
        status, body = _post(f"{gw.http_url}/v2/models/scores/infer", _body(random_rows(2), name="rows"))
        assert status == 200, body
        status, body = _post(f"{gw.http_url}/v2/models/scores/infer", _body(random_rows(2, n_in=15), name="rows"))
        assert status == 400 and b"expects shape [N, 16]" in body


def test_a_one_input_pipeline_takes_its_input_under_any_name(client, cluster, mlp_deployed, mlp_path):
    with gateway_for(client, cluster, Pipeline(model=mlp_deployed, inbox=_inbox(), partitions=1)) as gw:
        x = random_rows(2, seed=5)
        status, body = _post(f"{gw.http_url}/v2/models/scores/infer", _body(x, name="input__0"))
        assert status == 200, body
        got = np.asarray(_strict(body)["outputs"][0]["data"], np.float32).reshape(2, 2)
        np.testing.assert_array_equal(got, run_onnx_directly(mlp_path, {"x": x})["probabilities"])
        meta = _get(f"{gw.http_url}/v2/models/scores")
        assert meta["platform"] == "onnxruntime_onnx" and _tensors(meta, "inputs") == {"x": ("FP32", [-1, 16])}


def test_refused_and_bad_inputs_are_400_with_the_reason(client, cluster, mlp_deployed):
    pipe = (
        Pipeline(inbox=_inbox(), partitions=1)
        .filter(finite_rows, reason="rows must be finite and within 50")
        .map_batches(prep, name="prep")
        .infer(mlp_deployed)
        .map_batches(post, name="post")
    )
    with gateway_for(client, cluster, pipe) as gw:
        url = f"{gw.http_url}/v2/models/scores/infer"
        big = np.full((1, 16), 99.0, np.float32)
        status, body = _post(url, _body(big))
        assert status == 400, body
        assert "rejected by filter" in _strict(body)["error"] and "within 50" in _strict(body)["error"]
        status, body = _post(url, _body(random_rows(1, n_in=12)))
        assert status == 400 and "a row needs 16 features, got 12" in _strict(body)["error"], body
        with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
            req = pb.ModelInferRequest(model_name="scores")
            req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
            req.raw_input_contents.append(big.tobytes())
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "within 50" in info.value.details()


def test_a_fault_of_the_pipeline_is_500_with_an_error_id(client, cluster, mlp_deployed):
    pipe = Pipeline(inbox=_inbox(), partitions=1).infer(mlp_deployed).map_batches(broken_post, name="broken")
    with gateway_for(client, cluster, pipe) as gw:
        status, body = _post(f"{gw.http_url}/v2/models/scores/infer", _body(random_rows(1)))
        assert status == 500, body
        error = _strict(body)["error"]
        assert re.search(r"error id [0-9a-f]+", error) and "NoneType" not in error


def test_strict_json_both_ways(client, cluster, mlp_deployed):
    pipe = Pipeline(inbox=_inbox(), partitions=1).infer(mlp_deployed).map_batches(nan_post, name="nan")
    with gateway_for(client, cluster, pipe) as gw:
        url = f"{gw.http_url}/v2/models/scores/infer"
        x = np.zeros((2, 16), np.float32)
        raw = json.dumps(_body(x)).replace("0.0, 0.0", "NaN, 0.0", 1).encode()
        assert b"NaN" in raw
        status, body = _post(url, raw)
        assert status == 400, body
        assert "NaN, which JSON does not allow" in _strict(body)["error"]
        x[1, 0] = 1.0  # row 1's p1 becomes NaN
        status, body = _post(url, _body(x))
        assert status == 400, body
        error = _strict(body)["error"]
        assert "output 'p1' holds 1 NaN or infinite value(s), which JSON cannot carry" in error
        assert '"binary_data": true' in error
        # as binary data (Triton's extension), the same answer carries the NaN
        status, body = _post(url, _body(x, outputs=[{"name": "p1", "parameters": {"binary_data": True}}]))
        assert status == 200, body
        header, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # the JSON part, then the bytes
        assert len(body) - end == 16
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 16
        values = np.frombuffer(body[-16:], "<f8")
        assert np.isfinite(values[0]) and np.isnan(values[1])


def test_describe_says_where_the_tensors_come_from():
    from daskinfer.dataflow.stages import Ensemble, Infer, MapBatches
    from daskinfer.models.deploy import ModelMetadata
    from daskinfer.server.signature import describe
    from daskinfer.tensors import TensorSpec

    f32 = np.dtype(np.float32)
    i64 = np.dtype(np.int64)
    a = ModelMetadata("a", "3", "onnx", [TensorSpec("x", f32, (None, 4))], [TensorSpec("y", i64, (None,))])
    b = ModelMetadata("b", "1", "python", None, None)
    sig = describe([Ensemble(["a", "a"])], None, {"a": a})
    assert sig.inputs.specs == (TensorSpec("x", f32, (None, 4)),)
    assert sig.outputs.specs == (TensorSpec("y", np.dtype(np.float64), (None,)),), "the mean of ints is float64"
    sig = describe([Infer("b")], None, {"b": b})
    assert not sig.inputs.known and "model 'b' (infer 'b') does not declare its inputs" in sig.inputs.source
    sig = describe([Infer(None)], None, {"a": a})
    assert not sig.inputs.known and "each request names its model" in sig.inputs.source
    sig = describe([Infer("a"), MapBatches(post, name="post")], None, {"a": a}, outputs=["label"])
    assert sig.inputs.known and not sig.outputs.known and "map_batches 'post'" in sig.outputs.source
    sig = describe([Infer("a", outputs=["y"])], None, {"a": a}, outputs=["z"])
    assert not sig.outputs.known and "names 'z'" in sig.outputs.source
