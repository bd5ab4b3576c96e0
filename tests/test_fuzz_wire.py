"""Fuzzing the wire decoders with hypothesis: every input either decodes into well-typed values
or raises the documented error (CodecError / RequestError / RequestTooLargeError), nothing else.
The decoders: :func:`codec.decode`, the single messages of :mod:`daskinfer.wire.messages` and
the request/result frames of :mod:`daskinfer.wire.frames`.

Four sources of input: arbitrary bytes; msgpack built from random values, including array
extensions with random headers (reaches the array code); frames whose fields have random types
or lengths that do not add up; valid requests and results with bytes changed or cut.  The
number of examples per test is ``DASKINFER_FUZZ_EXAMPLES`` (default 150: about 30 s for all on
a busy 2-core machine); raise it for a longer run.
"""

from __future__ import annotations

import math
import os

import msgpack
import numpy as np
import pytest
from optional import require

from daskinfer.exceptions import CodecError, RequestError, RequestTooLargeError
from daskinfer.wire import codec, frames, result_frames
from daskinfer.wire.messages import Request, Result, decode_request, decode_result, peek_request_fields

require("hypothesis", "hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("DASKINFER_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- what goes in ---------------------------------------------------------------------------------
INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
DTYPE_STRS = [
    "<f4",
    "<f8",
    ">f8",
    "<i8",
    "|u1",
    "|b1",
    "<U3",
    "|S2",
    "<M8[ns]",
    "<c8",
    "|O",
    "|V4",
    "<U0",
    "i4,i4",
    "(2,)f4",
    "f4",
    "float128",
    "nonsense",
    "",
]


@st.composite
def array_ext(draw) -> msgpack.ExtType:
    """An array extension whose header and data may or may not agree."""
    dtype_str = draw(st.one_of(st.sampled_from(DTYPE_STRS), st.text(max_size=12), INTS, st.none()))
    shape = draw(
        st.one_of(
            st.lists(st.integers(min_value=0, max_value=6), max_size=4),
            st.lists(INTS, max_size=40),
            INTS,
            st.text(max_size=4),
        )
    )
    header = msgpack.packb([dtype_str, shape])
    if draw(st.booleans()):  # data of the right length when the header makes sense
        try:
            n = np.dtype(dtype_str).itemsize * math.prod(shape) if isinstance(shape, list) else -1
        except Exception:
            n = -1
        n = n if 0 <= n <= 4096 else draw(st.integers(0, 64))
    else:
        n = draw(st.integers(0, 64))
    hlen = draw(st.one_of(st.just(len(header)), st.integers(0, 2**16 - 1)))
    code = draw(st.one_of(st.just(codec.ARRAY_EXT), st.integers(0, 127)))
    return msgpack.ExtType(code, hlen.to_bytes(2, "little") + header + bytes(n))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    array_ext(),
)
KEYS = ["id", "in", "out", "err", "b", "k", "m", "d", "r", "t", "v", "tm", "x", "y"]


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=3), INTS), inner, max_size=5),
    )


values = st.recursive(scalars, _containers, max_leaves=12)


@st.composite
def message_like(draw) -> bytes:
    """A map with the fields of a request or result, each of a random type."""
    msg = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
    if draw(st.booleans()):
        msg["id"] = draw(st.text(min_size=1, max_size=6))
    if draw(st.booleans()):
        msg[draw(st.sampled_from(["in", "out"]))] = draw(st.dictionaries(st.text(max_size=3), array_ext(), max_size=3))
    return msgpack.packb(msg, use_bin_type=True)


def _valid_messages() -> list[bytes]:
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    return [
        Request(
            "fuzz-id",
            {"x": x, "s": np.array(["ab", "c"])},
            batched=True,
            key="k",
            model="m",
            deadline=1.5,
            reply_to="replies",
            sent_at=2.0,
        ).encode(),
        Request("one", {"x": x[0]}).encode(),
        Result(
            "fuzz-id",
            outputs={"y": x[:, :2]},
            model="m",
            version="2",
            batched=True,
            timings={"queue": 0.1},
            key="k",
            sent_at=1.0,
        ).encode(),
        Result("bad", error_type="ModelError", error="boom").encode(),
    ]


@st.composite
def mutated(draw) -> bytes:
    buf = bytearray(draw(st.sampled_from(_valid_messages())))
    for _ in range(draw(st.integers(1, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
    return bytes(buf if cut is None else buf[:cut])


FRAME_KEYS = ["f", "ids", "in", "out", "n", "b", "k", "m", "d", "r", "t", "v", "tm", "eids", "et", "em", "ek"]


@st.composite
def frame_like(draw) -> bytes:
    """A request or result frame: the frame fields of random types, or ids with arrays that may not add up."""
    msg = draw(st.dictionaries(st.sampled_from(FRAME_KEYS), values, max_size=draw(st.sampled_from([0, 1, 10]))))
    msg["f"] = draw(st.sampled_from([frames.FRAME_VERSION] * 3 + [2, "1"]))
    if draw(st.booleans()):
        n = draw(st.integers(0, 4))
        msg["ids"] = draw(st.lists(st.text(min_size=1, max_size=3), min_size=n, max_size=n))
        rows = n
        if draw(st.booleans()):
            per = draw(st.lists(st.integers(-2, 5), min_size=n, max_size=n))
            msg["n"], rows = np.asarray(per, dtype=np.int64), sum(per)
        if draw(st.booleans()):  # one key per request, of any type
            msg["k"] = draw(st.lists(scalars, min_size=n, max_size=n))
        rows = draw(st.sampled_from([rows, rows, rows, rows + 1, max(rows - 1, 0)]))  # mostly adding up
        msg[draw(st.sampled_from(["in", "out"]))] = {"x": np.zeros((max(rows, 0), 2), np.float32)}
    return codec.encode(msg)


@st.composite
def near_valid_frame(draw) -> bytes:
    """A valid request or result frame with one field replaced by a random value (reaches the deep checks)."""
    n = draw(st.integers(1, 4))
    per = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    block = {"x": np.zeros((sum(per), 2), np.float32)}
    msg: dict = {
        "f": frames.FRAME_VERSION,
        "ids": [f"r{i}" for i in range(n)],
        "n": np.asarray(per, np.int64),
        "b": True,
        "k": [f"k{i}" for i in range(n)],
        "m": "m",
        "t": np.zeros(n),
    }
    if draw(st.booleans()):
        msg.update({"in": block, "d": np.zeros(n), "r": "replies"})
    else:
        msg.update(
            {
                "out": block,
                "v": "1",
                "tm": {"queue": 0.1},
                "eids": ["e"],
                "et": ["ModelError"],
                "em": ["boom"],
                "ek": [None],
            }
        )
    field = draw(st.sampled_from(sorted(msg)))
    msg[field] = draw(st.one_of(values, st.lists(scalars, min_size=n, max_size=n)))
    return codec.encode(msg)


inputs = st.one_of(st.binary(max_size=300), message_like(), mutated(), frame_like())
frame_inputs = st.one_of(frame_like(), near_valid_frame(), mutated())
max_sizes = st.one_of(st.none(), st.integers(0, 400))


# -- what must come out ---------------------------------------------------------------------------
def _optional(value, types) -> bool:
    return value is None or isinstance(value, types)


def check_request(req: Request) -> None:
    assert isinstance(req, Request)
    assert isinstance(req.id, str) and req.id
    assert isinstance(req.inputs, dict)
    assert all(isinstance(k, str) and type(v) is np.ndarray for k, v in req.inputs.items())
    assert all(v.dtype.kind in "biufcUSMm" for v in req.inputs.values())
    assert isinstance(req.batched, bool)
    for value in (req.key, req.model, req.reply_to):
        assert _optional(value, str)
    for value in (req.deadline, req.sent_at):
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_result(res: Result) -> None:
    assert isinstance(res, Result)
    assert isinstance(res.id, str)
    assert res.outputs is None or (
        isinstance(res.outputs, dict)
        and all(isinstance(k, str) and type(v) is np.ndarray for k, v in res.outputs.items())
    )
    assert (res.error_type is None) == (res.error is None)
    for value in (res.error_type, res.error, res.model, res.version, res.key):
        assert _optional(value, str)
    assert isinstance(res.batched, bool)
    assert isinstance(res.timings, dict)
    assert all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in res.timings.items())
    assert res.sent_at is None or (isinstance(res.sent_at, (int, float)) and not isinstance(res.sent_at, bool))


# -- the properties -------------------------------------------------------------------------------
@FUZZ
@given(data=inputs, max_size=max_sizes)
def test_codec_decode_returns_or_raises_codec_errors(data, max_size):
    try:
        codec.decode(data, max_size=max_size)
    except (CodecError, RequestTooLargeError):
        pass


@FUZZ
@given(data=inputs, max_size=max_sizes)
def test_decode_request_returns_a_well_typed_request_or_raises_request_error(data, max_size):
    try:
        req = decode_request(data, max_size=max_size)
    except (CodecError, RequestError):  # RequestTooLargeError is a RequestError
        return
    check_request(req)


@FUZZ
@given(data=inputs, max_size=max_sizes)
def test_decode_result_returns_a_well_typed_result_or_raises_codec_error(data, max_size):
    try:
        res = decode_result(data, max_size=max_size)
    except (CodecError, RequestTooLargeError):
        return
    check_result(res)


@FUZZ
@given(data=st.one_of(inputs, st.text(max_size=5), INTS, st.none()))
def test_peek_request_fields_never_raises(data):
    fields = peek_request_fields(data)
    assert isinstance(fields, dict) and set(fields) <= {"id", "r", "k", "t"}
    assert all(isinstance(v, (str, int, float)) for v in fields.values())


@FUZZ
@given(data=frame_inputs, max_size=max_sizes)
def test_decode_requests_of_a_frame_returns_columns_or_raises_request_error(data, max_size):
    try:
        cols = frames.decode_requests(data, max_size=max_size)
    except (CodecError, RequestError):
        return
    assert all(type(i) is str for i in cols.ids)
    assert all(isinstance(k, str) and type(v) is np.ndarray for k, v in cols.inputs.items())
    assert cols.keys is None or all(k is None or type(k) is str for k in cols.keys)
    assert cols.model is None or type(cols.model) is str


@FUZZ
@given(data=frame_inputs, max_size=max_sizes)
def test_decode_results_of_a_frame_gives_results_or_raises_codec_error(data, max_size):
    try:
        results = result_frames.decode_results(data, max_size=max_size).results()
    except (CodecError, RequestTooLargeError):
        return
    for res in results:
        assert isinstance(res, Result) and isinstance(res.id, str)


@FUZZ
@given(data=st.one_of(inputs, st.text(max_size=5), INTS, st.none()))
def test_peek_fields_of_a_frame_never_raises(data):
    fields = frames.peek_fields(data)
    assert isinstance(fields, dict) and set(fields) <= {"id", "ids", "r", "k", "t"}


@pytest.mark.parametrize("data", _valid_messages(), ids=["request", "row", "result", "error"])
def test_the_fuzzers_seeds_decode(data):
    """The mutated inputs start from messages that decode (so mutations reach deep code)."""
    msg = codec.decode(data)
    if "in" in msg:
        check_request(decode_request(data))
    else:
        check_result(decode_result(data))


_SPLIT_HEAD = frames.encode_request_frame(
    ["s1"], {"x": np.ones((64, 16), np.float32)}, rows=np.array([64]), split=True
).head


@st.composite
def mutated_head(draw) -> bytes:
    """The head of a valid split frame with a few bytes changed (reaches the split array checks)."""
    buf = bytearray(_SPLIT_HEAD)
    for _ in range(draw(st.integers(1, 3))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf)


split_inputs = st.builds(
    codec.SplitMessage,
    head=st.one_of(frame_inputs, st.just(_SPLIT_HEAD), mutated_head()),
    buffers=st.lists(st.one_of(st.binary(max_size=300), st.just(b"\x00" * 4096)), max_size=3).map(tuple),
)


@FUZZ
@given(data=split_inputs, max_size=max_sizes)
def test_decode_requests_of_a_split_message_returns_columns_or_raises_request_error(data, max_size):
    """A split message from a broken or hostile client (any head, any buffers) decodes or says why."""
    try:
        cols = frames.decode_requests(data, max_size=max_size)
    except (CodecError, RequestError):
        fields = frames.peek_fields(data)
        assert isinstance(fields, dict) and set(fields) <= {"id", "ids", "r", "k", "t"}
        return
    assert all(type(i) is str for i in cols.ids)
    assert all(isinstance(k, str) and type(v) is np.ndarray for k, v in cols.inputs.items())
