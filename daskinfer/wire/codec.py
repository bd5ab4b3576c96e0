"""Wire codec: msgpack plus raw numpy buffers. Never pickle.

Arrays travel as msgpack extension type 1 whose payload is a small msgpack header
``[dtype, shape]`` followed by the array's raw C-ordered bytes.  Decoding checks
the dtype against an allow-list (no object, void or structured dtypes), the shape
against the byte count, and the message against a size limit; anything wrong
raises :class:`~daskinfer.exceptions.CodecError`, never anything worse.

Headers repeat (the same dtype and shape for every request of a model), so each side
keeps a least-recently-used cache of ``HEADER_CACHE_SIZE`` headers: junk headers from
a hostile or broken sender evict each other, never a header in steady use, and only
headers that parsed are kept.  :func:`header_cache_info` reports their sizes and hits.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from typing import Any

import msgpack
import numpy as np

from daskinfer import settings
from daskinfer.exceptions import CodecError, RequestTooLargeError

ARRAY_EXT = 1
_ALLOWED_KINDS = set("biufcUSMm")  # bool, ints, floats, complex, str, bytes, datetimes
_HEADER_LEN = struct.Struct("<H")
HEADER_CACHE_SIZE = 4096  # headers kept per side (encoding, decoding); least recently used go first
MAX_HEADER_BYTES = 1024  # a real header ([dtype, up to 32 dims]) is a few hundred bytes at most
_new_ext = tuple.__new__


def wire_dtype(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` can travel in messages (numbers, bools, strings, bytes, datetimes;
    not object, void or structured dtypes)."""
    return dtype.kind in _ALLOWED_KINDS and dtype.fields is None


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode object of type {type(obj).__name__}")


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _array_prefix(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    """Length-prefixed header of arrays of this dtype and shape (checked once, then cached)."""
    dtype = np.dtype(dtype_str)  # a structured dtype's str is "|V<n>": refused below as kind "V"
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
        raise TypeError(f"cannot encode arrays of dtype {dtype} (object/structured dtypes are not allowed)")
    header = msgpack.packb([dtype_str, list(shape)])
    return _HEADER_LEN.pack(len(header)) + header


def _encode_array(arr: np.ndarray) -> msgpack.ExtType:
    prefix = _array_prefix(arr.dtype.str, arr.shape)
    # tobytes() is C order for any layout; the ExtType is made without its Python-level
    # argument checks (the code and the bytes are ours), which cost more than the copy
    return _new_ext(msgpack.ExtType, (ARRAY_EXT, prefix + arr.tobytes()))


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)  # errors are not cached: only good headers take room
def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        dtype_str, shape = msgpack.unpackb(header)
        dtype = np.dtype(dtype_str) if isinstance(dtype_str, str) else None
    except Exception as e:
        raise CodecError(f"malformed array header: {e}") from None
    if dtype is None or dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise CodecError(f"array dtype {dtype_str!r} is not allowed")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 32:
        raise CodecError(f"malformed array shape {shape!r}")
    return dtype, tuple(shape), dtype.itemsize * math.prod(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code} (only {ARRAY_EXT}, numpy array, is known)")
    if len(data) < _HEADER_LEN.size:
        raise CodecError("truncated array header")
    (hlen,) = _HEADER_LEN.unpack_from(data)
    if hlen > MAX_HEADER_BYTES:
        raise CodecError(f"array header of {hlen} bytes is over the limit of {MAX_HEADER_BYTES} bytes")
    dtype, shape, expected = _parse_header(data[2 : 2 + hlen])
    nbytes = len(data) - 2 - hlen
    if nbytes != expected:
        raise CodecError(f"array of dtype {dtype} and shape {list(shape)} needs {expected} bytes, got {nbytes}")
    return np.frombuffer(data, dtype=dtype, offset=2 + hlen).reshape(shape)


def header_cache_info() -> dict[str, int]:
    """Sizes and hit counts of the header caches (``encoded``/``decoded`` entries, ``*_hits``, ``*_misses``)."""
    enc, dec = _array_prefix.cache_info(), _parse_header.cache_info()
    return {
        "encoded": enc.currsize,
        "encoded_hits": enc.hits,
        "encoded_misses": enc.misses,
        "decoded": dec.currsize,
        "decoded_hits": dec.hits,
        "decoded_misses": dec.misses,
    }


_local = threading.local()


def _packer() -> msgpack.Packer:
    packer = getattr(_local, "packer", None)
    if packer is None:  # a Packer is not thread-safe: one per thread
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return packer


def encode_array(arr: np.ndarray) -> msgpack.ExtType:
    """The wire form of an array, for message builders that skip the ``default`` hook."""
    try:
        return _encode_array(arr)
    except TypeError as e:
        raise CodecError(f"cannot encode message: {e}") from e


def encode(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, bytes, numbers, None and numpy arrays)."""
    try:
        return _packer().pack(obj)
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
    limit = max_size if max_size is not None else settings.get_bytes("codec.max-message-size")
    if len(data) > limit:
        raise RequestTooLargeError(f"message of {len(data)} bytes is over the limit of {limit} bytes")
    if not data:
        raise CodecError(
            "empty message (0 bytes): expected a msgpack map (on a Redis stream, the message is the value of "
            "the entry's field 'd'; an entry without that field is empty)"
        )
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        if "incomplete input" in str(e):
            raise CodecError(
                f"malformed message: its {len(data)} bytes end inside a msgpack value (cut short, or not msgpack)"
            ) from None
        raise CodecError(f"malformed message ({type(e).__name__}: {e})") from None
