"""Fuzzing the v2 request parsers and the servers behind them (hypothesis, bounded in CI).

Every input either decodes or raises the documented error
(:class:`~daskinfer.remote.v2.TensorDecodeError`), never anything else; a server
answers 200 or 400 / INVALID_ARGUMENT (NOT_FOUND for a model name it does not serve),
never 500 / INTERNAL.  Examples mix junk with near-valid requests (right shape, wrong
length; right length, wrong type) so that the deep checks are reached too.
"""

from __future__ import annotations

import http.client
import json

import grpc
import numpy as np
import pytest
from optional import require

from daskinfer import ModelServer, OnnxModel
from daskinfer.remote import v2
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.server.grpc_server import decode_request

require("hypothesis", "hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SERVER = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DATATYPES = [*v2.V2_TO_NUMPY, v2.BYTES]
datatypes = st.sampled_from(DATATYPES) | st.sampled_from(["", "FP99", "fp32", "TYPE_FP32"])
json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=6)
json_values = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=20
)
header_text = st.text(alphabet="0123456789x- .", max_size=4)  # what can travel in an HTTP header
# values of one tensor's data: mostly of one kind (so that a datatype can match), sometimes mixed
data_items = (
    st.floats(width=32)
    | st.integers(-300, 300)
    | st.integers(-(2**64), 2**64)
    | st.text(max_size=2)
    | st.booleans()
    | st.none()
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
)
dims = st.integers(-2, 6) | st.integers(-(2**63), 2**63 - 1)
shapes = st.lists(dims, max_size=4)
small_shapes = st.lists(st.integers(0, 3), max_size=3)


_KIND_VALUES = {
    "f": st.floats(width=32),
    "i": st.integers(-(2**64), 2**64),
    "u": st.integers(-(2**64), 2**64),
    "b": st.booleans(),
}
_POISON = st.sampled_from([None, {}, [], 1, 1.5, True, "a", 2**70])


@st.composite
def data_of(draw, datatype: str, n: int):
    """``n`` JSON values of ``datatype``'s kind; every other time one of them is of another kind."""
    dtype = v2.V2_TO_NUMPY.get(datatype)
    values = draw(st.lists(st.text(max_size=3) if dtype is None else _KIND_VALUES[dtype.kind], min_size=n, max_size=n))
    if values and _now_and_then(draw, 2):
        values[draw(st.integers(0, len(values) - 1))] = draw(_POISON)
    return values


@st.composite
def json_tensors(draw, datatype: str | None = None):
    """A v2 REST tensor: often well-formed, sometimes with one part wrong, sometimes junk."""
    kind = draw(st.sampled_from(["good", "good", "good-binary", "good-binary", "mutated", "junk"]))
    if kind == "junk":
        return draw(json_values), b""
    rows = draw(st.integers(0, 3))
    datatype = datatype or draw(st.sampled_from(DATATYPES))
    shape = [rows, 16] if draw(st.booleans()) else draw(small_shapes) if not _now_and_then(draw, 4) else draw(shapes)
    name = draw(st.sampled_from(["x", "y", ""]) | st.text(max_size=3))
    n = _elements(shape, otherwise=3)
    t: dict = {"name": name, "datatype": datatype, "shape": shape}
    binary = b""
    if kind == "good-binary":
        size = n * (v2.V2_TO_NUMPY[datatype].itemsize if datatype in v2.V2_TO_NUMPY else 4)
        binary = draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=64))
        t["parameters"] = {
            "binary_data_size": draw(st.sampled_from([len(binary)]) | st.integers(-3, 100) | json_values)
        }
    else:
        t["data"] = draw(data_of(datatype, n)) if not _now_and_then(draw, 4) else draw(json_values)
    if kind == "mutated":
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        t[key] = draw(json_values)
    return t, binary


@st.composite
def rest_bodies(draw):
    """(body bytes, Inference-Header-Content-Length value or None)."""
    tensors = draw(st.lists(json_tensors(), max_size=3))
    request: dict = {"inputs": [t for t, _ in tensors]}
    output = st.fixed_dictionaries(
        {"name": st.sampled_from(["probabilities", "nope"])},
        optional={"parameters": st.fixed_dictionaries({}, optional={"binary_data": st.booleans()})},
    )
    parameters = st.fixed_dictionaries(
        {}, optional={"binary_data_output": st.booleans(), "timeout": st.integers(1, 10**7)}
    )
    for key, valid in (
        ("outputs", st.lists(output, max_size=2)),
        ("parameters", parameters),
        ("id", st.text(max_size=4)),
    ):
        if _now_and_then(draw, 2):
            request[key] = draw(json_values) if _now_and_then(draw, 5) else draw(valid)
    if _now_and_then(draw, 10):
        request = draw(json_values)
    head = json.dumps(request).encode()
    binary = b"".join(b for _, b in tensors) + (draw(st.binary(max_size=8)) if _now_and_then(draw, 5) else b"")
    header = len(head) if binary or _now_and_then(draw, 2) else None
    if _now_and_then(draw, 10):  # a wrong header
        header = draw(st.integers(-5, len(head) + len(binary) + 5) | header_text)
    if _now_and_then(draw, 10):
        return draw(st.binary(max_size=200)), draw(st.none() | st.integers(-5, 300))
    return head + binary, header


def _elements(shape: list[int], otherwise: int) -> int:
    """Elements of ``shape`` when that is a small number; else ``otherwise`` (a mismatch, on purpose)."""
    n = int(np.prod(shape)) if all(0 <= d < 100 for d in shape) else -1
    return n if 0 <= n <= 64 else otherwise


def _now_and_then(draw, one_in: int) -> bool:
    """True for about one draw in ``one_in`` (integers would favour 0, the simplest value)."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


def _decodes_or_says_why(fn, *args) -> None:
    try:
        fn(*args)
    except v2.TensorDecodeError as e:
        assert str(e)  # a message that says what is wrong


@FUZZ
@given(rest_bodies())
def test_rest_parser_decodes_or_raises_tensor_decode_error(body_and_header):
    _decodes_or_says_why(v2.decode_rest_request, *body_and_header)


@pytest.mark.parametrize("datatype", DATATYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_each_datatype_decodes_or_raises_tensor_decode_error(datatype, data):
    tensor, binary = data.draw(json_tensors(datatype))
    body = json.dumps({"inputs": [tensor]}).encode()
    _decodes_or_says_why(v2.decode_rest_request, body + binary, len(body) if binary else None)


@FUZZ
@given(st.binary(max_size=300), st.none() | st.integers(-10, 400) | st.text(max_size=5))
def test_rest_parser_on_arbitrary_bytes(body, header):
    _decodes_or_says_why(v2.decode_rest_request, body, header)


@st.composite
def grpc_requests(draw):
    req = pb.ModelInferRequest(model_name="mlp", id=draw(st.text(max_size=4)))
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        datatype = draw(datatypes)
        rows = draw(st.integers(0, 3))
        shape = [rows, 16] if draw(st.booleans()) else draw(shapes)
        t = req.inputs.add(name=draw(st.sampled_from(["x", "y"]) | st.text(max_size=3)), datatype=datatype, shape=shape)
        if use_raw:
            n = rows * 16 * (v2.V2_TO_NUMPY[datatype].itemsize if datatype in v2.V2_TO_NUMPY else 4)
            req.raw_input_contents.append(draw(st.binary(min_size=n, max_size=n) | st.binary(max_size=80)))
        else:
            fields = sorted(set(v2.CONTENTS_FIELD.values()))
            field = draw(st.sampled_from([v2.CONTENTS_FIELD.get(datatype, "fp32_contents")] * 3 + fields))
            n = _elements(shape, otherwise=rows * 16)
            size = draw(st.sampled_from([n, n, rows * 16]) | st.integers(0, 40))
            values = {
                "bool_contents": st.booleans(),
                "int_contents": st.integers(-(2**31), 2**31 - 1),
                "int64_contents": st.integers(-(2**63), 2**63 - 1),
                "uint_contents": st.integers(0, 2**32 - 1),
                "uint64_contents": st.integers(0, 2**64 - 1),
                "fp32_contents": st.floats(width=32),
                "fp64_contents": st.floats(),
                "bytes_contents": st.binary(max_size=5),
            }[field]
            getattr(t.contents, field).extend(draw(st.lists(values, min_size=size, max_size=size)))
    if use_raw and _now_and_then(draw, 6):
        req.raw_input_contents.append(draw(st.binary(max_size=10)))  # one buffer too many
    return req


@FUZZ
@given(grpc_requests())
def test_grpc_parser_decodes_or_raises_tensor_decode_error(req):
    _decodes_or_says_why(decode_request, req)


# -- the servers: 200 or 400 / INVALID_ARGUMENT, never 500 / INTERNAL ------------------------
@pytest.fixture(scope="module")
def server(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def grpc_infer(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )


@FUZZ_SERVER
@given(body_and_header=rest_bodies())
def test_rest_server_answers_200_or_400(server, body_and_header):
    body, header = body_and_header
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers[v2.INFERENCE_HEADER] = str(header)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request("POST", "/v2/models/mlp/infer", body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status in (200, 400), (resp.status, payload[:300])
    if resp.status == 400:
        assert json.loads(payload)["error"]


@FUZZ_SERVER
@given(req=grpc_requests(), junk=st.none() | st.binary(max_size=120))
def test_grpc_server_answers_ok_or_invalid_argument(grpc_infer, req, junk):
    data = req.SerializeToString() if junk is None else junk
    try:
        grpc_infer(data, timeout=30)
    except grpc.RpcError as e:
        allowed = {grpc.StatusCode.INVALID_ARGUMENT} | ({grpc.StatusCode.NOT_FOUND} if junk is not None else set())
        assert e.code() in allowed, (e.code(), e.details())
