"""Wire codec and messages: what goes in comes out, and bad bytes give CodecError, never worse."""

from __future__ import annotations

import dask
import msgpack
import numpy as np
import pytest

from daskinfer.exceptions import CodecError, RequestError, RequestTooLargeError
from daskinfer.wire import codec
from daskinfer.wire.messages import (
    Request,
    Result,
    decode_request,
    decode_result,
    error_result,
    peek_request_fields,
)

DTYPES = [
    "float32",
    "float64",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]


def _assert_same_array(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_array_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    _assert_same_array(codec.decode(codec.encode(arr)), arr)


@pytest.mark.parametrize(
    "arr",
    [
        pytest.param(np.array(3.5), id="0-d float"),
        pytest.param(np.array(7, dtype=np.int8), id="0-d int8"),
        pytest.param(np.zeros((0,), np.float32), id="empty"),
        pytest.param(np.zeros((0, 16), np.float32), id="empty rows"),
        pytest.param(np.zeros((2, 0, 3), np.float16), id="empty middle dim"),
        pytest.param(np.array(["a", "héllo", ""]), id="unicode"),
        pytest.param(np.array([b"ab", b"\x00c"]), id="bytes"),
        pytest.param(np.arange(6, dtype=">f8"), id="big endian"),
        pytest.param(np.array(["2024-01-01", "NaT"], dtype="datetime64[ns]"), id="datetime"),
        pytest.param(np.array([1 + 2j, 3j], dtype=np.complex64), id="complex"),
    ],
)
def test_array_round_trip_edge_cases(arr):
    _assert_same_array(codec.decode(codec.encode(arr)), arr)


def test_non_contiguous_and_fortran_arrays_round_trip_with_their_values():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    strided = base[::2, 1::3]
    fortran = np.asfortranarray(base)
    transposed = base.T
    assert not strided.flags.c_contiguous and not fortran.flags.c_contiguous
    for arr in (strided, fortran, transposed):
        _assert_same_array(codec.decode(codec.encode(arr)), arr)


def test_nested_message_round_trip():
    msg = {
        "s": "text",
        "b": b"\x00\xffraw",
        "i": -(2**40),
        "u": 2**63,
        "f": 1.25,
        "none": None,
        "t": True,
        "list": [1, "two", None, [3.0, {"deep": np.arange(3, dtype=np.int16)}]],
        "arrays": {"x": np.ones((2, 2), np.float32), "y": np.array([True, False])},
        7: "int keys are kept",
    }
    out = codec.decode(codec.encode(msg))
    assert set(out) == set(msg)
    for k in ("s", "b", "i", "u", "f", "none", "t"):
        assert out[k] == msg[k] and type(out[k]) is type(msg[k])
    assert out[7] == "int keys are kept"
    assert out["list"][:3] == [1, "two", None]
    assert out["list"][3][0] == 3.0
    _assert_same_array(out["list"][3][1]["deep"], msg["list"][3][1]["deep"])
    _assert_same_array(out["arrays"]["x"], msg["arrays"]["x"])
    _assert_same_array(out["arrays"]["y"], msg["arrays"]["y"])


def test_numpy_scalars_and_tuples_encode_as_plain_values():
    out = codec.decode(codec.encode({"f": np.float32(1.5), "i": np.int64(3), "t": (1, 2)}))
    assert out == {"f": 1.5, "i": 3, "t": [1, 2]}


def test_object_dtype_array_cannot_be_encoded():
    with pytest.raises(CodecError, match="dtype object"):
        codec.encode({"x": np.array([{"a": 1}, None], dtype=object)})


def test_unknown_python_object_cannot_be_encoded():
    with pytest.raises(CodecError, match="set"):
        codec.encode({"x": {1, 2}})


# -- malformed bytes ---------------------------------------------------------------------------


def _array_ext(dtype_str, shape, data: bytes) -> bytes:
    header = msgpack.packb([dtype_str, shape])
    return msgpack.packb({"x": msgpack.ExtType(codec.ARRAY_EXT, len(header).to_bytes(2, "little") + header + data)})


def test_garbage_bytes_raise_codec_error():
    with pytest.raises(CodecError, match="malformed message"):
        codec.decode(b"\xc1\xc1\xc1")  # 0xc1 is never used in msgpack


def test_truncated_message_raises_codec_error():
    data = codec.encode({"x": np.arange(100, dtype=np.float64), "id": "abc"})
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            codec.decode(data[:cut])


def test_unknown_extension_type_raises_codec_error():
    data = msgpack.packb({"x": msgpack.ExtType(42, b"whatever")})
    with pytest.raises(CodecError, match="unknown msgpack extension type 42"):
        codec.decode(data)


@pytest.mark.parametrize("dtype_str", ["|O", "O", "V8", "[('a', '<i4')]", "not-a-dtype", "<U0"])
def test_disallowed_or_bad_dtype_raises_codec_error(dtype_str):
    with pytest.raises(CodecError, match="dtype|header"):
        codec.decode(_array_ext(dtype_str, [1], b"\x00" * 8))


def test_shape_and_byte_count_mismatch_raises_codec_error():
    with pytest.raises(CodecError, match=r"needs 24 bytes, got 16"):
        codec.decode(_array_ext("<f8", [3], b"\x00" * 16))


@pytest.mark.parametrize("shape", [[-1], ["3"], 3, [2**62, 2**62, 4]])
def test_bad_shape_raises_codec_error(shape):
    with pytest.raises(CodecError):
        codec.decode(_array_ext("<f8", shape, b"\x00" * 8))


def test_truncated_array_header_raises_codec_error():
    data = msgpack.packb({"x": msgpack.ExtType(codec.ARRAY_EXT, b"\x05")})
    with pytest.raises(CodecError, match="truncated array header"):
        codec.decode(data)


@pytest.mark.parametrize("value", ["a string", 123, None, [b"bytes in a list"]])
def test_non_bytes_input_raises_codec_error(value):
    with pytest.raises(CodecError, match="expected bytes"):
        codec.decode(value)


def test_bytearray_and_memoryview_are_accepted():
    data = codec.encode({"x": np.arange(4, dtype=np.int32)})
    for buf in (bytearray(data), memoryview(data)):
        _assert_same_array(codec.decode(buf)["x"], np.arange(4, dtype=np.int32))


# -- size limit --------------------------------------------------------------------------------


def test_oversized_message_raises_request_too_large_with_max_size():
    data = codec.encode({"x": np.zeros(1000, np.float64)})
    with pytest.raises(RequestTooLargeError, match=f"{len(data)} bytes is over the limit of 1000 bytes"):
        codec.decode(data, max_size=1000)
    assert codec.decode(data, max_size=len(data))["x"].shape == (1000,)


def test_oversized_message_raises_request_too_large_with_config():
    data = codec.encode({"x": np.zeros(1000, np.float64)})
    with dask.config.set({"daskinfer.codec.max-message-size": "1KiB"}):
        with pytest.raises(RequestTooLargeError, match="limit of 1024 bytes"):
            codec.decode(data)
        with pytest.raises(RequestTooLargeError):
            decode_request(Request("big", {"x": np.zeros(1000)}).encode())
    assert codec.decode(data)["x"].shape == (1000,)  # default limit (64MiB) again


def test_request_too_large_is_a_request_error():
    # one oversized request becomes an error result for that request, like any bad request
    assert issubclass(RequestTooLargeError, RequestError)
    assert issubclass(CodecError, RequestError)


# -- requests and results ----------------------------------------------------------------------


def test_request_round_trip_keeps_every_field():
    req = Request(
        id="req-1",
        inputs={"x": np.arange(32, dtype=np.float32).reshape(2, 16), "mask": np.array([True, False])},
        batched=True,
        key="user-7",
        model="mlp",
        deadline=1700000000.5,
        reply_to="answers",
        sent_at=1699999999.25,
    )
    out = decode_request(req.encode())
    assert (out.id, out.batched, out.key, out.model, out.deadline, out.reply_to, out.sent_at) == (
        "req-1",
        True,
        "user-7",
        "mlp",
        1700000000.5,
        "answers",
        1699999999.25,
    )
    assert set(out.inputs) == {"x", "mask"}
    _assert_same_array(out.inputs["x"], req.inputs["x"])
    _assert_same_array(out.inputs["mask"], req.inputs["mask"])
    assert out.rows == 2


def test_minimal_request_round_trip_has_defaults():
    out = decode_request(Request("r", {"x": np.ones(16, np.float32)}).encode())
    assert out.batched is False and out.rows == 1
    assert (out.key, out.model, out.deadline, out.reply_to, out.sent_at) == (None,) * 5


def test_result_round_trip_keeps_every_field():
    res = Result(
        id="req-1",
        outputs={"probabilities": np.array([[0.25, 0.75]], np.float32)},
        model="mlp",
        version="3",
        batched=True,
        timings={"queue": 0.001, "infer": 0.0002, "batch": 64},
        key="user-7",
        sent_at=12.5,
    )
    out = decode_result(res.encode())
    assert out.ok
    assert (out.id, out.model, out.version, out.batched, out.key, out.sent_at) == (
        "req-1",
        "mlp",
        "3",
        True,
        "user-7",
        12.5,
    )
    assert out.timings == res.timings
    _assert_same_array(out.value(), res.outputs["probabilities"])


def test_error_result_round_trip_raises_on_value():
    from daskinfer.exceptions import InputValidationError, ResultError

    res = error_result(
        "req-9", InputValidationError("model 'mlp': input 'x' expects dtype float32, got float64"), model="mlp"
    )
    out = decode_result(res.encode())
    assert not out.ok
    assert out.error_type == "InputValidationError"
    with pytest.raises(ResultError, match="request req-9 failed: InputValidationError: model 'mlp': input 'x'") as info:
        out.value()
    assert info.value.request_id == "req-9"
    assert info.value.error_type == "InputValidationError"


@pytest.mark.parametrize(
    "field, value",
    [("k", 5), ("m", ["mlp"]), ("r", 1.5), ("d", "tomorrow"), ("t", b"now"), ("b", "yes")],
)
def test_request_with_wrong_field_type_names_the_request(field, value):
    msg = {"id": "req-42", "in": {"x": np.ones((1, 16), np.float32)}, field: value}
    with pytest.raises(RequestError, match=rf"request req-42: field '{field}'") as info:
        decode_request(codec.encode(msg))
    assert info.value.request_id == "req-42"


def test_request_with_non_array_input_names_request_and_input():
    msg = {"id": "req-43", "in": {"x": [1.0, 2.0]}}
    with pytest.raises(RequestError, match=r"request req-43: input 'x' must be a numpy array, got list") as info:
        decode_request(codec.encode(msg))
    assert info.value.request_id == "req-43"


def test_request_with_inputs_not_a_map_names_request():
    with pytest.raises(RequestError, match=r"request req-44: 'in' must be a map") as info:
        decode_request(codec.encode({"id": "req-44", "in": [np.ones(3)]}))
    assert info.value.request_id == "req-44"


@pytest.mark.parametrize("rid", [None, "", 17])
def test_request_without_valid_id_is_a_request_error(rid):
    msg = {"in": {"x": np.ones(3)}} if rid is None else {"id": rid, "in": {"x": np.ones(3)}}
    with pytest.raises(RequestError, match="request id must be a non-empty string"):
        decode_request(codec.encode(msg))


def test_request_that_is_not_a_map_is_a_codec_error():
    with pytest.raises(CodecError, match="a request must be a map, got list"):
        decode_request(codec.encode([1, 2, 3]))


def test_an_empty_message_says_it_is_empty_and_where_redis_keeps_the_bytes():
    # a Redis entry whose field is not 'd' reaches the decoder as 0 bytes
    with pytest.raises(CodecError, match=r"empty message \(0 bytes\).*field 'd'"):
        codec.decode(b"")


def test_a_truncated_message_says_it_ends_early():
    data = Request("req-7", {"x": np.zeros(16, np.float32)}).encode()[:-7]
    with pytest.raises(CodecError, match=rf"its {len(data)} bytes end inside a msgpack value") as info:
        codec.decode(data)
    assert "incomplete input" not in str(info.value)


@pytest.mark.parametrize(
    "field, hint",
    [("inputs", "'in'"), ("key", "'k'"), ("reply_to", "'r'"), ("modle", "'m'"), ("extra", None)],
)
def test_an_unknown_request_field_is_named_with_the_field_it_may_mean(field, hint):
    msg = {"id": "req-8", "in": {"x": np.zeros(16, np.float32)}, field: "value"}
    with pytest.raises(RequestError, match=rf"request req-8: unknown field '{field}'") as info:
        decode_request(codec.encode(msg))
    assert info.value.request_id == "req-8"
    if hint is None:
        assert "did you mean" not in str(info.value)
    else:
        assert f"(did you mean {hint}?)" in str(info.value), str(info.value)
    assert "['b', 'd', 'db', 'id', 'in', 'k', 'm', 'r', 't', 'tp']" in str(info.value)


def test_a_request_without_in_says_so_and_names_the_misspelt_field():
    msg = {"id": "req-9", "inputs": {"x": np.zeros(16, np.float32)}}
    with pytest.raises(RequestError, match=r"unknown field 'inputs' \(did you mean 'in'\?\)"):
        decode_request(codec.encode(msg))
    with pytest.raises(RequestError, match=r"request req-9 has no field 'in'"):
        decode_request(codec.encode({"id": "req-9"}))
    with pytest.raises(RequestError, match=r"request id must be .* unknown field 'ID' \(did you mean 'id'\?\)"):
        decode_request(codec.encode({"ID": "req-9", "in": {"x": np.zeros(2)}}))


def test_an_unknown_frame_field_is_named():
    from daskinfer.wire.frames import decode_requests

    msg = {"f": 1, "ids": ["a"], "in": {"x": np.zeros((1, 16), np.float32)}, "keys": ["k1"]}
    with pytest.raises(CodecError, match=r"request frame: unknown field 'keys' \(did you mean 'k'\?\)"):
        decode_requests(codec.encode(msg))


def test_peek_finds_the_id_of_a_request_that_fails_to_decode():
    data = codec.encode({"id": "req-5", "r": "replies", "in": {"x": [1, 2]}})
    with pytest.raises(RequestError):
        decode_request(data)
    assert peek_request_fields(data) == {"id": "req-5", "r": "replies"}
    assert peek_request_fields(b"\xc1garbage") == {}


# -- fuzz --------------------------------------------------------------------------------------


def test_fuzz_random_bytes_never_raise_anything_but_codec_errors():
    rng = np.random.default_rng(2024)
    valid = Request(
        "fuzz-id",
        {"x": np.arange(48, dtype=np.float32).reshape(3, 16), "s": np.array(["ab", "c"])},
        batched=True,
        key="k",
        deadline=1.5,
    ).encode()
    decoded = 0
    for i in range(2000):
        if i % 2:
            # random bytes of random length
            data = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        else:
            # a valid request with a few bytes changed, sometimes truncated: reaches deeper code
            buf = bytearray(valid)
            for pos in rng.integers(0, len(buf), int(rng.integers(1, 4))):
                buf[pos] = int(rng.integers(0, 256))
            data = bytes(buf[: int(rng.integers(1, len(buf) + 1))] if i % 6 == 0 else buf)
        try:
            req = decode_request(data)
        except (CodecError, RequestError):
            continue
        except Exception as e:  # pragma: no cover - this is the failure being looked for
            pytest.fail(f"case {i}: {data!r} raised {type(e).__name__}: {e}")
        decoded += 1
        assert isinstance(req, Request) and isinstance(req.id, str)
        assert all(isinstance(v, np.ndarray) for v in req.inputs.values())
    # mutated valid requests should sometimes still decode (e.g. a changed array byte)
    assert decoded > 0
