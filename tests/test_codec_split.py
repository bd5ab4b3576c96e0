"""Split messages (codec.encode_split): large arrays beside the msgpack bytes, never copied on the way.

The direct transport sends them as distributed frames of their own; these tests hold the codec to
the same values as the one-blob form, to views (no copy) on both sides, and to clear errors for a
split message that a broken or hostile sender made.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from daskinfer.exceptions import CodecError, RequestTooLargeError
from daskinfer.wire import codec, frames

BIG = 4096  # rows of 16 float32: 256 KiB, well over SPLIT_MIN_BYTES


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "arr",
    [
        pytest.param(np.arange(BIG * 16, dtype=np.float32).reshape(BIG, 16), id="float32 rows"),
        pytest.param(np.arange(1000, dtype=">f8"), id="big endian"),
        pytest.param(np.array(["2024-01-01", "NaT"] * 200, dtype="datetime64[ns]"), id="datetime"),
        pytest.param(np.array(["héllo", "a"] * 300), id="unicode"),
        pytest.param(np.arange(4000, dtype=np.int64).reshape(40, 100)[::2, 1::3], id="strided"),
        pytest.param(np.asfortranarray(np.ones((50, 60), np.float32)), id="fortran"),
        pytest.param(np.zeros((0, 16), np.float32), id="empty"),
        pytest.param(np.arange(3, dtype=np.int8), id="small"),
    ],
)
def test_split_messages_decode_to_the_same_values_as_one_blob(arr):
    msg = {"in": {"x": arr}, "ids": ["a"], "n": np.arange(2)}
    split = codec.encode_split(msg)
    _same(codec.decode(split)["in"]["x"], arr)
    _same(codec.decode(codec.encode(msg))["in"]["x"], arr)
    assert len(split) == len(split.head) + sum(memoryview(b).nbytes for b in split.buffers)
    big = arr.nbytes >= codec.SPLIT_MIN_BYTES
    assert len(split.buffers) == (1 if big else 0)  # small arrays stay in the msgpack bytes


def test_a_contiguous_array_is_not_copied_on_either_side():
    arr = np.arange(BIG * 16, dtype=np.float32).reshape(BIG, 16)
    split = codec.encode_split({"x": arr})
    (buf,) = split.buffers
    assert np.shares_memory(np.frombuffer(buf, np.uint8), arr)  # the buffer is the array's memory
    received = bytearray(buf)  # as a comm reads it: one buffer, then views of it
    got = codec.decode(codec.SplitMessage(split.head, (memoryview(received),)))["x"]
    assert np.shares_memory(got, np.frombuffer(received, np.uint8))
    assert not got.flags.writeable  # as arrays read from bytes: a stage that writes to its inputs copies


def test_request_frames_split_and_decode_with_their_fields():
    block = np.random.default_rng(0).standard_normal((BIG, 16)).astype(np.float32)
    data = frames.encode_request_frame(
        ["r1", "r2"], {"x": block}, rows=np.array([BIG - 10, 10]), batched=True, keys=["k", None], split=True
    )
    assert isinstance(data, codec.SplitMessage) and len(data.buffers) == 1
    cols = frames.decode_requests(data)
    assert cols.ids == ["r1", "r2"] and cols.keys == ["k", None] and cols.rows.tolist() == [BIG - 10, 10]
    _same(cols.inputs["x"], block)
    assert frames.peek_fields(data)["ids"] == ["r1", "r2"]


def _split_block() -> codec.SplitMessage:
    return codec.encode_split({"x": np.ones((BIG, 16), np.float32)})


def test_a_split_message_naming_a_buffer_it_lacks_is_a_codec_error():
    split = _split_block()
    with pytest.raises(CodecError, match="names buffer 0, but the message has 0 buffers"):
        codec.decode(codec.SplitMessage(split.head, ()))


def test_a_split_buffer_of_the_wrong_size_is_a_codec_error():
    split = _split_block()
    with pytest.raises(CodecError, match=r"float32 and shape \[4096, 16\] needs 262144 bytes, its buffer has 10"):
        codec.decode(codec.SplitMessage(split.head, (b"0123456789",)))


def test_a_malformed_split_reference_is_a_codec_error():
    prefix = codec.encode_array(np.zeros(2, np.float32)).data[:-8]  # the header, without the bytes
    head = msgpack.packb({"x": msgpack.ExtType(codec.SPLIT_ARRAY_EXT, prefix + b"\x00")})
    with pytest.raises(CodecError, match="malformed split array reference"):
        codec.decode(codec.SplitMessage(head, (b"\x00" * 8,)))


def test_a_split_message_over_the_size_limit_counts_its_buffers():
    split = _split_block()
    assert len(split.head) < 100
    with pytest.raises(RequestTooLargeError, match=f"message of {len(split)} bytes is over the limit of 1000"):
        codec.decode(split, max_size=1000)


def test_an_empty_split_message_says_it_is_empty():
    with pytest.raises(CodecError, match="empty message"):
        codec.decode(codec.SplitMessage(b""))


def test_as_bytes_gives_a_split_message_in_one_piece_and_refuses_what_is_not_a_message():
    msg = {"x": np.arange(BIG, dtype=np.float64), "id": "a"}
    joined = codec.as_bytes(codec.encode_split(msg))
    _same(codec.decode(joined)["x"], msg["x"])  # decodable bytes, for a broker
    broken = codec.SplitMessage(codec.encode_split(msg).head, ())
    assert codec.as_bytes(broken) == bytes(broken.head)  # one that does not decode: its bytes as they came
    plain = codec.encode(msg)
    assert codec.as_bytes(plain) is plain
    with pytest.raises(TypeError, match="expected bytes or a SplitMessage, got int"):
        codec.as_bytes(42)
