"""The codec's header caches: bounded, the least recently used entry evicted, so a header in use
keeps being served from the cache (and decoded right) however much junk arrives around it."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from daskinfer.exceptions import CodecError
from daskinfer.wire import codec


def _array_message(dtype_str: str, shape: list, data: bytes) -> bytes:
    header = msgpack.packb([dtype_str, shape])
    return msgpack.packb({"x": msgpack.ExtType(codec.ARRAY_EXT, len(header).to_bytes(2, "little") + header + data)})


def _junk(n: int, start: int) -> None:
    """``n`` valid headers of new shapes on both sides (decoding fails after the header is parsed)."""
    for i in range(start, start + n):
        with pytest.raises(CodecError, match="needs"):
            codec.decode(_array_message("<f4", [i + 1, 7, 3], b""))
        codec.encode(np.zeros((i + 1, 1, 2), np.int8))


def test_junk_headers_cannot_grow_the_caches_past_their_bound_nor_keep_a_new_header_out():
    bound = codec.HEADER_CACHE_SIZE
    _junk(bound + 10, 0)  # the caches are full of junk
    info = codec.header_cache_info()
    assert info["decoded"] <= bound and info["encoded"] <= bound

    good = np.arange(32, dtype=np.float32).reshape(2, 16)  # a header first seen after the junk
    good_msg = codec.encode({"x": good})
    codec.decode(good_msg)
    for round_ in range(8):  # more junk, with the good header in use now and then
        _junk(bound // 4, bound + 10 + round_ * bound // 4)
        before = codec.header_cache_info()
        out = codec.decode(good_msg)["x"]
        assert out.dtype == np.float32 and out.shape == (2, 16)
        np.testing.assert_array_equal(out, good)
        np.testing.assert_array_equal(codec.decode(codec.encode(good)), good)
        after = codec.header_cache_info()
        # served from the caches, not parsed again
        assert after["decoded_hits"] - before["decoded_hits"] == 2
        assert after["encoded_hits"] - before["encoded_hits"] == 1
        assert after["decoded"] <= bound and after["encoded"] <= bound


def test_an_overlong_array_header_is_refused_before_it_is_parsed():
    header = msgpack.packb(["<f4", [1]]) + b" " * 2000
    data = msgpack.packb(
        {"x": msgpack.ExtType(codec.ARRAY_EXT, len(header).to_bytes(2, "little") + header + b"\0" * 4)}
    )
    with pytest.raises(CodecError, match="array header of 2007 bytes is over the limit"):
        codec.decode(data)
