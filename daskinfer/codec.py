"""Wire codec: msgpack plus raw numpy buffers. Never pickle.

Arrays travel as msgpack extension type 1 whose payload is a small msgpack header
``[dtype, shape]`` followed by the array's raw C-ordered bytes.  Decoding checks
the dtype against an allow-list (no object, void or structured dtypes), the shape
against the byte count, and the message against a size limit; anything wrong
raises :class:`~daskinfer.exceptions.CodecError`, never anything worse.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from daskinfer import config
from daskinfer.exceptions import CodecError, RequestTooLargeError

ARRAY_EXT = 1
_ALLOWED_KINDS = set("biufcUSMm")  # bool, ints, floats, complex, str, bytes, datetimes
_HEADER_LEN = struct.Struct("<H")


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode object of type {type(obj).__name__}")


def _encode_array(arr: np.ndarray) -> msgpack.ExtType:
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.fields is not None:
        raise TypeError(f"cannot encode arrays of dtype {arr.dtype} (object/structured dtypes are not allowed)")
    header = msgpack.packb([arr.dtype.str, list(arr.shape)])
    data = np.ascontiguousarray(arr).tobytes()
    return msgpack.ExtType(ARRAY_EXT, _HEADER_LEN.pack(len(header)) + header + data)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code} (only {ARRAY_EXT}, numpy array, is known)")
    if len(data) < _HEADER_LEN.size:
        raise CodecError("truncated array header")
    (hlen,) = _HEADER_LEN.unpack_from(data)
    try:
        dtype_str, shape = msgpack.unpackb(data[2 : 2 + hlen])
        dtype = np.dtype(dtype_str) if isinstance(dtype_str, str) else None
    except Exception as e:
        raise CodecError(f"malformed array header: {e}") from None
    if dtype is None or dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise CodecError(f"array dtype {dtype_str!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 32:
        raise CodecError(f"malformed array shape {shape!r}")
    nbytes = len(data) - 2 - hlen
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes != expected:
        raise CodecError(f"array of dtype {dtype} and shape {shape} needs {expected} bytes, got {nbytes}")
    return np.frombuffer(data, dtype=dtype, offset=2 + hlen).reshape(shape)


def encode(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, bytes, numbers, None and numpy arrays)."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode message: {e}") from e


def decode(data: bytes | bytearray | memoryview, *, max_size: int | None = None) -> Any:
    """Decode bytes made by :func:`encode`.

    Parameters
    ----------
    data : bytes
        The message.
    max_size : int, optional
        Largest accepted message in bytes; config ``daskinfer.codec.max-message-size``.

    Raises
    ------
    RequestTooLargeError
        The message is over ``max_size``.
    CodecError
        The bytes are not a valid message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    limit = config.get_bytes("codec.max-message-size", max_size)
    if len(data) > limit:
        raise RequestTooLargeError(f"message of {len(data)} bytes is over the limit of {limit} bytes")
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, max_buffer_size=limit or 0)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        raise CodecError(f"malformed message ({type(e).__name__}: {e})") from None
