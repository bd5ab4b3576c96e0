"""Wire codec: msgpack plus raw numpy buffers. Never pickle.

Arrays travel as msgpack extension type 1 whose payload is a small msgpack header
``[dtype, shape]`` followed by the array's raw C-ordered bytes.  Decoding checks
the dtype against an allow-list (no object, void or structured dtypes), the shape
against the byte count, and the message against a size limit; anything wrong
raises :class:`~daskinfer.exceptions.CodecError`, never anything worse.

A message can also travel *split* (:class:`SplitMessage`, made by :func:`encode_split`): its
arrays of at least ``SPLIT_MIN_BYTES`` bytes are left out of the msgpack bytes and travel beside
them as raw buffers, which a transport that writes several buffers (distributed's comms) sends
without copying them; in their place the msgpack bytes hold extension type 2, the same header
followed by the buffer's index (uint32).  :func:`decode` reads both forms.

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
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from daskinfer import settings
from daskinfer.exceptions import CodecError, RequestTooLargeError

ARRAY_EXT = 1
SPLIT_ARRAY_EXT = 2
SPLIT_MIN_BYTES = 2048
"""Smaller arrays stay in a split message's msgpack bytes: copying them costs less than a buffer of their own."""
_INDEX = struct.Struct("<I")
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


@dataclass(frozen=True, slots=True)
class SplitMessage:
    """A message whose large arrays travel beside it (see the module docstring).

    Attributes
    ----------
    head : bytes or memoryview
        The msgpack bytes, with extension type 2 where an array was.
    buffers : tuple of buffers
        The raw C-ordered bytes of each array left out, in the order ``head`` names them.
    nbytes : int
        Bytes in all (also its ``len``, as of an encoded message); counted once, when it is made.
    """

    head: bytes | memoryview
    buffers: tuple[Any, ...] = ()
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # queues, size limits and write bounds all ask for it: counted once (frozen: set this way)
        object.__setattr__(self, "nbytes", len(self.head) + sum(memoryview(b).nbytes for b in self.buffers))

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        """Its head and then its buffers, as one ``bytes`` (what a dead letter keeps of it)."""
        return b"".join([bytes(self.head), *(bytes(memoryview(b)) for b in self.buffers)])


def as_bytes(data: Encoded) -> bytes:
    """``data`` as one bytes, for a broker or a dead letter: bytes as they are (no copy); a split
    message as the same message in one piece (:func:`encode`), or, one that does not decode, its
    bytes as they came (:meth:`SplitMessage.tobytes`).

    Raises
    ------
    TypeError
        ``data`` is none of these (``bytes(42)`` would be 42 zero bytes).
    """
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, SplitMessage):
        try:
            return encode(decode(data, max_size=len(data)))
        except CodecError:
            return data.tobytes()
    raise TypeError(f"expected bytes or a SplitMessage, got {type(data).__name__}")


Encoded = bytes | bytearray | memoryview | SplitMessage
"""A message as :func:`encode` or :func:`encode_split` made it: what :func:`decode` reads."""


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


def _read_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """The dtype, shape and byte count an extension's header names, and where the header ends."""
    if len(data) < _HEADER_LEN.size:
        raise CodecError("truncated array header")
    (hlen,) = _HEADER_LEN.unpack_from(data)
    if hlen > MAX_HEADER_BYTES:
        raise CodecError(f"array header of {hlen} bytes is over the limit of {MAX_HEADER_BYTES} bytes")
    dtype, shape, expected = _parse_header(data[2 : 2 + hlen])
    return dtype, shape, expected, 2 + hlen


def _ext_hook(code: int, data: bytes) -> Any:
    if code == SPLIT_ARRAY_EXT:  # in a message without buffers: said as the split hook says it
        return _split_ext_hook(())(code, data)
    if code != ARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code} (only {ARRAY_EXT}, numpy array, is known)")
    dtype, shape, expected, start = _read_header(data)
    nbytes = len(data) - start
    if nbytes != expected:
        raise CodecError(f"array of dtype {dtype} and shape {list(shape)} needs {expected} bytes, got {nbytes}")
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape)


def _split_ext_hook(buffers: tuple[Any, ...]) -> Any:
    """The extension hook of a split message's head: type 1 as usual, type 2 a view of its buffer."""

    def hook(code: int, data: bytes) -> Any:
        if code != SPLIT_ARRAY_EXT:
            return _ext_hook(code, data)
        dtype, shape, expected, start = _read_header(data)
        if len(data) != start + _INDEX.size:
            raise CodecError("malformed split array reference (expected a header and a uint32 buffer index)")
        (index,) = _INDEX.unpack_from(data, start)
        if index >= len(buffers):
            raise CodecError(f"split array names buffer {index}, but the message has {len(buffers)} buffers")
        buf = memoryview(buffers[index]).cast("B")
        if buf.nbytes != expected:
            raise CodecError(
                f"array of dtype {dtype} and shape {list(shape)} needs {expected} bytes, its buffer has {buf.nbytes}"
            )
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        arr.flags.writeable = False  # as arrays read from bytes: a stage that writes to its inputs copies them
        return arr

    return hook


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


def _split_packer() -> tuple[msgpack.Packer, list[Any]]:
    packer = getattr(_local, "split_packer", None)
    if packer is None:
        buffers: list[Any] = []

        def default(obj: Any) -> Any:
            if isinstance(obj, np.ndarray) and obj.nbytes >= SPLIT_MIN_BYTES:
                arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
                prefix = _array_prefix(arr.dtype.str, arr.shape)
                buffers.append(arr.reshape(-1).view(np.uint8).data)  # a view: no copy (any dtype, as bytes)
                return _new_ext(msgpack.ExtType, (SPLIT_ARRAY_EXT, prefix + _INDEX.pack(len(buffers) - 1)))
            return _default(obj)

        packer = _local.split_packer = msgpack.Packer(default=default, use_bin_type=True)
        _local.split_buffers = buffers
    return packer, _local.split_buffers


def encode_split(obj: Any) -> SplitMessage:
    """Encode a message as :func:`encode` does, its large arrays left out as buffers (no copy of them).

    The buffers are views of the arrays (C-contiguous ones; others are copied once): they must not
    change until the message is sent.
    """
    packer, buffers = _split_packer()
    buffers.clear()
    try:
        head = packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        packer.reset()
        raise CodecError(f"cannot encode message: {e}") from e
    finally:
        found = tuple(buffers)
        buffers.clear()
    return SplitMessage(head, found)


def encode(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, bytes, numbers, None and numpy arrays)."""
    try:
        return _packer().pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode message: {e}") from e


def decode_fields(data: Encoded) -> Any:
    """Best effort: the message without its arrays (each is None), for naming what failed to decode.

    Raises
    ------
    CodecError
        Not even the msgpack bytes decode.
    """
    head = data.head if type(data) is SplitMessage else data
    try:
        return msgpack.unpackb(head, ext_hook=lambda code, payload: None, raw=False, strict_map_key=False)
    except Exception as e:
        raise CodecError(f"malformed message ({type(e).__name__}: {e})") from None


def decode(data: Encoded, *, max_size: int | None = None) -> Any:
    """Decode a message made by :func:`encode` (bytes) or :func:`encode_split`.

    Parameters
    ----------
    data : bytes or SplitMessage
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
    ext_hook = _ext_hook
    if type(data) is SplitMessage:
        ext_hook = _split_ext_hook(data.buffers)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    limit = max_size if max_size is not None else settings.get_bytes("codec.max-message-size")
    size = len(data)
    if size > limit:
        raise RequestTooLargeError(f"message of {size} bytes is over the limit of {limit} bytes")
    if type(data) is SplitMessage:
        data = data.head
    if not data:
        raise CodecError(
            "empty message (0 bytes): expected a msgpack map (on a Redis stream, the message is the value of "
            "the entry's field 'd'; an entry without that field is empty)"
        )
    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        if "incomplete input" in str(e):
            raise CodecError(
                f"malformed message: its {len(data)} bytes end inside a msgpack value (cut short, or not msgpack)"
            ) from None
        raise CodecError(f"malformed message ({type(e).__name__}: {e})") from None
