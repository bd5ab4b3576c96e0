"""KServe v2 (Open Inference Protocol) requests on broker inboxes: the mapping to and from columns.

A v2 request marked by its headers (Kafka) or fields (Redis) decodes into the same
``RequestColumns`` as a msgpack block request; its answer is a v2 response.  No broker here:
tests/test_v2_brokers.py runs the same through real Redis and Kafka from the shell.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from daskinfer.connectors.base import Messages
from daskinfer.connectors.redis.framing import more_fields, unpack_entries
from daskinfer.dataflow.batch import ResultBatch, ResultPart
from daskinfer.dataflow.nodes import decode_read
from daskinfer.dataflow.results import ResultWriter
from daskinfer.exceptions import CodecError, InputValidationError, RequestError, RequestTooLargeError
from daskinfer.remote.v2 import TensorDecodeError
from daskinfer.wire import codec, v2json
from daskinfer.wire.frames import decode_requests

JSON_META = {"content-type": b"application/json"}
DATATYPES = {
    "BOOL": ("|b1", [True, False, True, True]),
    "INT8": ("|i1", [-128, 0, 1, 127]),
    "INT16": ("<i2", [-32768, 0, 1, 32767]),
    "INT32": ("<i4", [-(2**31), 0, 1, 2**31 - 1]),
    "INT64": ("<i8", [-(2**63), 0, 1, 2**63 - 1]),
    "UINT8": ("|u1", [0, 1, 2, 255]),
    "UINT16": ("<u2", [0, 1, 2, 65535]),
    "UINT32": ("<u4", [0, 1, 2, 2**32 - 1]),
    "UINT64": ("<u8", [0, 1, 2, 2**63]),
    "FP16": ("<f2", [0.5, -1.0, 2.0, 65504.0]),
    "FP32": ("<f4", [0.25, -1.5, 3.0, 1e30]),
    "FP64": ("<f8", [0.1, -1e300, 3.0, 5e-324]),
}


def _body(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"id": "q1", "inputs": inputs, **extra}).encode()


def _tensor(name: str, datatype: str, shape: list[int], data) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_maps_to_its_numpy_dtype_with_rows_first_and_row_major_data(datatype):
    dtype, values = DATATYPES[datatype]
    cols = decode_requests(_body([_tensor("x", datatype, [2, 2], values)]), meta=JSON_META)
    x = cols.inputs["x"]
    assert x.dtype == np.dtype(dtype), f"{datatype}: expected numpy {dtype}, got {x.dtype}"
    assert x.shape == (2, 2)
    np.testing.assert_array_equal(x, np.array(values, dtype=dtype).reshape(2, 2))  # row-major
    assert cols.ids == ["q1"] and cols.batched and not cols.framed and list(cols.rows) == [2]


def test_bytes_are_utf8_strings_and_nested_data_is_row_major():
    body = _body(
        [
            _tensor("text", "BYTES", [3], ["héllo", "", "a b"]),
            _tensor("x", "FP32", [3, 2], [[1, 2], [3, 4], [5, 6]]),
        ]
    )
    cols = decode_requests(body, meta=JSON_META)
    assert cols.inputs["text"].dtype.kind == "S"
    assert cols.inputs["text"].tolist() == ["héllo".encode(), b"", b"a b"]
    np.testing.assert_array_equal(cols.inputs["x"], np.arange(1, 7, dtype=np.float32).reshape(3, 2))


def test_headers_give_the_reply_target_key_model_and_the_timeout_a_deadline_budget():
    meta = {
        "Content-Type": b"application/json; charset=utf-8",
        "reply_to": b"daskinfer-replies-me",  # case, _ and - do not count
        "KEY": b"user-7",
        "model": b"mlp",
        "traceparent": b"00-abc-def-01",  # someone else's header: ignored
    }
    body = _body([_tensor("x", "FP32", [1, 2], [1, 2])], parameters={"timeout": 2_500_000})
    cols = decode_requests(body, meta=meta)
    assert (cols.reply_to, cols.keys, cols.model) == ("daskinfer-replies-me", ["user-7"], "mlp")
    assert cols.budgets is not None and cols.budgets.tolist() == [2.5]
    assert cols.v2 is not None and dict(cols.v2.headers)["reply-to"] == "daskinfer-replies-me"


def test_binary_tensor_data_after_the_json_header():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    words = [b"ab", "ç".encode()]
    raw_words = b"".join(struct.pack("<I", len(w)) + w for w in words)
    head = json.dumps(
        {
            "id": "b1",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}},
                {"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw_words)}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    ).encode()
    meta = {"content-type": b"application/octet-stream", "inference-header-content-length": str(len(head)).encode()}
    cols = decode_requests(head + x.tobytes() + raw_words, meta=meta)
    np.testing.assert_array_equal(cols.inputs["x"], x)
    assert cols.inputs["w"].tolist() == words
    assert cols.v2 is not None and cols.v2.outputs == ("y", "z")
    assert cols.v2.wants_binary("y") and not cols.v2.wants_binary("z")


@pytest.mark.parametrize(
    "body, meta, error, says",
    [
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', JSON_META, RequestError,
         "needs an 'id'"),
        (_body([_tensor("x", "FP32", [1, 16], [0] * 15)]), JSON_META, CodecError,
         "shape [1, 16] needs 16 values, got 15"),
        (_body([_tensor("x", "UINT64", [2], [1, 2**64])]), JSON_META, CodecError,
         "value 18446744073709551616 is outside the range of UINT64"),
        (b'{"id": "q1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', JSON_META,
         CodecError, "NaN, which JSON does not allow"),
        (_body([_tensor("x", "FP33", [1], [1])]), JSON_META, CodecError, "datatype 'FP33'; expected one of"),
        (_body([_tensor("x", "FP32", [], [1])]), JSON_META, InputValidationError, "needs arrays with a row dimension"),
        (_body([_tensor("x", "FP32", [0, 2], [])]), JSON_META, InputValidationError, "empty batch (0 rows)"),
        (_body([_tensor("a", "FP32", [2], [1, 2]), _tensor("b", "FP32", [3], [1, 2, 3])]), JSON_META,
         InputValidationError, "different numbers of rows"),
        (_body([]), JSON_META, InputValidationError, "empty request (no inputs)"),
        (b'{"id": "q1", "inputs": [', JSON_META, CodecError, "not JSON"),
        (_body([_tensor("x", "FP32", [1], [1])]), {"content-type": b"application/x-protobuf"}, CodecError,
         "unsupported content-type 'application/x-protobuf'"),
        (_body([_tensor("x", "FP32", [1], [1])]), {"content-type": b"application/octet-stream"}, CodecError,
         "needs the header 'inference-header-content-length'"),
        (_body([_tensor("x", "FP32", [1], [1])]), {**JSON_META, "replyto": b"daskinfer-replies-me"}, RequestError,
         "unknown v2 header 'replyto' (did you mean 'reply-to'?)"),
        (_body([_tensor("x", "FP32", [1], [1])]), {"inference-header-content-length": b"many"}, CodecError,
         "expected a number of bytes"),
        (_body([_tensor("x", "FP32", [1], [1])], parameters={"timeout": -1}), JSON_META, CodecError,
         "parameter 'timeout' is -1"),
    ],
)  # fmt: skip
def test_malformed_v2_requests_say_what_was_expected(body, meta, error, says):
    with pytest.raises(error) as info:
        decode_requests(body, meta=meta)
    assert says in str(info.value), f"expected {says!r} in the error, got {info.value}"


def test_the_message_size_is_bounded():
    with pytest.raises(RequestTooLargeError, match="over the limit of 100 bytes"):
        decode_requests(_body([_tensor("x", "FP32", [64], [0.0] * 64)]), max_size=100, meta=JSON_META)


def test_unmarked_json_is_msgpack_and_the_error_says_how_to_mark_it():
    body = _body([_tensor("x", "FP32", [1], [1])])
    for meta in (None, {}, {"content-type": b"application/msgpack"}, {"source": b"app-1"}):
        with pytest.raises(CodecError, match="needs the Kafka header or Redis field 'content-type'"):
            decode_requests(body, meta=meta)


def test_a_v2_request_is_the_same_block_as_a_msgpack_one():
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    v2cols = decode_requests(_body([_tensor("x", "FP32", [3, 16], x.ravel().tolist())]), meta=JSON_META)
    mpcols = decode_requests(codec.encode({"id": "q1", "b": True, "in": {"x": x}}))
    for field in ("ids", "batched", "keys", "model", "reply_to", "framed"):
        assert getattr(v2cols, field) == getattr(mpcols, field), field
    np.testing.assert_array_equal(v2cols.inputs["x"], mpcols.inputs["x"])
    assert v2cols.inputs["x"].dtype == mpcols.inputs["x"].dtype and list(v2cols.rows) == list(mpcols.rows)


# -- answers -----------------------------------------------------------------------------------


def test_responses_carry_every_output_datatype_and_bytes_as_strings():
    outputs = {name: np.array(values, dtype=dtype).reshape(2, 2) for name, (dtype, values) in DATATYPES.items()}
    outputs["label"] = np.array([["a", "é"], ["", "z"]])
    body, headers = v2json.encode_response("q1", "mlp", "2", outputs, v2json.V2Reply())
    assert headers == (("content-type", "application/json"),)
    resp = json.loads(body)
    assert (resp["id"], resp["model_name"], resp["model_version"]) == ("q1", "mlp", "2")
    got = {t["name"]: t for t in resp["outputs"]}
    for name, (dtype, values) in DATATYPES.items():
        assert got[name]["datatype"] == name and got[name]["shape"] == [2, 2]
        np.testing.assert_array_equal(np.array(got[name]["data"], dtype=dtype), np.array(values, dtype=dtype))
    assert got["label"] == {"name": "label", "shape": [2, 2], "datatype": "BYTES", "data": ["a", "é", "", "z"]}


def test_responses_keep_the_outputs_asked_for_and_send_binary_where_asked():
    y = np.array([[np.nan, 1.0]], dtype=np.float32)
    z = np.array([[3]], dtype=np.int64)
    reply = v2json.V2Reply(outputs=("z", "y"), binary=frozenset({"y"}))
    body, headers = v2json.encode_response("q1", "m", "1", {"y": y, "z": z, "other": z}, reply)
    assert dict(headers)["content-type"] == "application/octet-stream"
    n = int(dict(headers)["inference-header-content-length"])
    resp = json.loads(body[:n])
    assert [t["name"] for t in resp["outputs"]] == ["z", "y"]
    assert resp["outputs"][1]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(1, 2), y)  # NaN travels as binary
    with pytest.raises(RequestError, match=r"asks for output 'w'; the pipeline's outputs are \['y', 'z'\]"):
        v2json.encode_response("q1", "m", "1", {"y": y, "z": z}, v2json.V2Reply(outputs=("w",)))
    with pytest.raises(TensorDecodeError, match="NaN or infinite"):
        v2json.encode_response("q1", "m", "1", {"y": y}, v2json.V2Reply())


def test_the_writer_answers_v2_requests_in_v2_and_keeps_their_headers_in_dead_letters():
    meta = {"content-type": b"application/json", "reply-to": b"daskinfer-replies-me", "key": b"k1"}
    good = _body([_tensor("x", "FP32", [2, 2], [1, 2, 3, 4])])
    bad = b'{"id": "q2", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1]}]}'
    cut = b'{"id": "q3", "inp'
    batch = decode_read([good, bad, cut, codec.encode({"id": "m1", "in": {"x": np.zeros(2)}})],
                        Messages([good, bad, cut, b""], None, [meta, meta, meta, None]), 2**20)  # fmt: skip
    assert [len(b) for b in batch.requests] == [1, 1] and len(batch.rejected) == 2
    writer = ResultWriter("outbox", "dead", ["daskinfer-replies-"])
    v2batch = next(b for b in batch.requests if b.origins[0].v2 is not None)
    out = writer.encode(
        ResultBatch(
            [ResultPart(v2batch, {"y": np.array([[0.5], [1.5]], np.float32)}, model="mlp", version="1")],
            batch.rejected,
            batch.reads,
        )
    )
    answers = {m.correlation_id: m for m in out if m.target == "daskinfer-replies-me"}
    ok = json.loads(answers["q1"].data)
    assert ok["outputs"] == [{"name": "y", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 1.5]}]
    assert answers["q1"].key == "k1" and answers["q1"].headers == (("content-type", "application/json"),)
    assert (
        json.loads(answers["q2"].data)["id"] == "q2"
        and "needs 2 values, got 1" in json.loads(answers["q2"].data)["error"]
    )
    (undecodable,) = [m for cid, m in answers.items() if cid.startswith("undecodable-")]
    assert set(json.loads(undecodable.data)) == {"error"}, "no id could be read: a v2 error without one"
    letters = {codec.decode(m.data)["id"]: codec.decode(m.data) for m in out if m.target == "dead"}
    assert letters["q2"]["data"] == bad and letters["q2"]["headers"]["reply-to"] == "daskinfer-replies-me"
    assert letters["q2"]["error_type"] == "CodecError"


def test_redis_read_replies_carry_the_other_fields_and_the_deliver_script_writes_them():
    def field(name: bytes, value: bytes) -> bytes:
        return struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value

    meta = field(b"content-type", b"application/json") + field(b"reply-to", b"daskinfer-replies-x")
    data = b'{"id": "q1"}'
    buf = struct.pack(">III", 3, len(data), len(meta)) + b"1-0" + meta + data + struct.pack(">III", 3, 1, 0) + b"2-0d"
    assert unpack_entries([buf]) == [
        ("1-0", data, {"content-type": b"application/json", "reply-to": b"daskinfer-replies-x"}),
        ("2-0", b"d", None),
    ]
    assert more_fields((("content-type", "application/json"),)) == "content-type\napplication/json\n"
