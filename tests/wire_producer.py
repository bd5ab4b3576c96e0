"""A producer and consumer of daskinfer messages written from docs/wire.rst alone.

Plain ``msgpack`` and the standard library: no daskinfer import (a test checks that), no numpy.
This is what a producer in another language does; tests/test_wire_conformance.py uses it
against real Redis and Kafka brokers.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

ARRAY = 1  # msgpack extension type of an array


@dataclass(frozen=True)
class Array:
    """An array as the wire carries it: numpy's dtype string, the shape, the raw C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def values(self) -> list[Any]:
        """The elements, flat (for the little-endian numeric dtypes used here)."""
        codes = {"<f4": "f", "<f8": "d", "<i8": "q", "<i4": "i", "|b1": "?", "|u1": "B"}
        code = codes[self.dtype]
        return list(struct.unpack(f"<{math.prod(self.shape)}{code}", self.data))


def array(dtype: str, shape: tuple[int, ...], values: list[Any]) -> Array:
    """An array of ``values`` (flat, row-major) of a little-endian numeric dtype."""
    codes = {"<f4": "f", "<f8": "d", "<i8": "q", "<i4": "i"}
    assert len(values) == math.prod(shape)
    return Array(dtype, tuple(shape), struct.pack(f"<{len(values)}{codes[dtype]}", *values))


def _ext(a: Array) -> msgpack.ExtType:
    header = msgpack.packb([a.dtype, list(a.shape)])
    return msgpack.ExtType(ARRAY, struct.pack("<H", len(header)) + header + a.data)


def _default(obj: Any) -> Any:
    if isinstance(obj, Array):
        return _ext(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY:
        return msgpack.ExtType(code, data)
    (n,) = struct.unpack_from("<H", data)
    dtype, shape = msgpack.unpackb(data[2 : 2 + n])
    return Array(dtype, tuple(shape), bytes(data[2 + n :]))


def encode(message: dict[str, Any]) -> bytes:
    """A request message or frame (a dict whose arrays are :class:`Array`) as bytes."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    """A result message, result frame or dead letter; arrays come back as :class:`Array`."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)


def crc32_partition(key: str, partitions: int) -> int:
    """The partition of a key: CRC-32 (zlib's, unsigned) of its UTF-8 bytes, modulo the partitions."""
    import zlib

    return zlib.crc32(key.encode("utf-8")) % partitions
