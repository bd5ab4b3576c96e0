"""Tensors of the KServe v2 / Open Inference Protocol: datatypes and the three encodings (raw
little-endian bytes, gRPC's typed ``InferTensorContents``, JSON lists), each checked as it is
decoded (see :mod:`daskinfer.remote.v2`)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb


class TensorDecodeError(ValueError):
    """A tensor from the network does not match its own datatype or shape."""


# v2 datatype -> numpy dtype (little-endian on the wire)
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"

INFERENCE_HEADER = "Inference-Header-Content-Length"
"""HTTP header of the binary tensor extension: length of the JSON part of the body."""

MAX_ELEMENTS = 2**48
"""Most elements one tensor's shape may describe (far beyond any message size limit)."""

# v2 datatype -> the InferTensorContents field that carries it
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# which JSON value kinds (numpy ``dtype.kind`` of the parsed list) a datatype accepts
_JSON_KINDS: dict[str, str] = {
    "BOOL": "b",
    "FP16": "fiub",
    "FP32": "fiub",
    "FP64": "fiub",
    "BYTES": "USO",
}


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype (strings and bytes are ``BYTES``)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "USO":
        return BYTES
    for name, d in V2_TO_NUMPY.items():
        if d.kind == dtype.kind and d.itemsize == dtype.itemsize:
            return name
    raise TensorDecodeError(f"numpy dtype {dtype} has no KServe v2 datatype")


def numpy_dtype(datatype: str, tensor: str = "?") -> np.dtype | None:
    """The numpy dtype of a v2 datatype (``None`` for ``BYTES``); raises for unknown names."""
    if datatype == BYTES:
        return None
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise TensorDecodeError(
            f"tensor {tensor!r} has datatype {datatype!r}; expected one of {sorted([*V2_TO_NUMPY, BYTES])}"
        ) from None


def _check_shape(shape: Sequence[int], tensor: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"tensor {tensor!r} has a negative dimension in shape {list(shape)}")
    if len(shape) > 32:
        raise TensorDecodeError(f"tensor {tensor!r} has {len(shape)} dimensions; at most 32 are supported")
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    if extent > MAX_ELEMENTS:
        raise TensorDecodeError(f"tensor {tensor!r}: shape {list(shape)} is too large (more than 2**48 elements)")
    return shape


def _check_range(values: np.ndarray, dtype: np.dtype, tensor: str) -> None:
    """Integers that ``dtype`` cannot hold are an error, not a silent wrap-around."""
    if dtype.kind not in "iu" or values.size == 0 or values.dtype.kind not in "iub":
        return
    info = np.iinfo(dtype)
    lo, hi = values.min(), values.max()
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise TensorDecodeError(
            f"tensor {tensor!r}: value {int(bad)} is outside the range of {datatype_of(dtype)} [{info.min}, {info.max}]"
        )


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _as_bytes_list(arr: np.ndarray) -> list[bytes]:
    out = []
    for v in arr.ravel().tolist():
        if isinstance(v, bytes):
            out.append(v)
        elif isinstance(v, str):
            out.append(v.encode("utf-8"))
        else:
            out.append(str(v).encode("utf-8"))
    return out


def _bytes_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    # a fixed-width bytes array: numeric-like dtype that the rest of daskinfer accepts
    return arr.astype(np.bytes_).reshape(shape) if items else np.empty(shape, dtype="S1")


# -- raw bytes ----------------------------------------------------------------------------
def to_raw(arr: np.ndarray) -> bytes:
    """Flattened row-major little-endian bytes of ``arr`` (BYTES: 4-byte length prefixes)."""
    if np.dtype(arr.dtype).kind in "USO":
        return b"".join(struct.pack("<I", len(b)) + b for b in _as_bytes_list(arr))
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    return np.ascontiguousarray(arr, dtype=dt).tobytes()


def add_raw_tensors(tensors: Any, raw_contents: Any, block: dict[str, np.ndarray]) -> None:
    """Append ``block``'s arrays to a request's ``inputs`` (or a response's ``outputs``) with
    their bytes in the matching ``raw_*_contents`` field."""
    raw = []
    for name, arr in block.items():
        t = tensors.add()
        t.name = name
        t.datatype = datatype_of(arr.dtype)
        t.shape.extend(arr.shape)
        raw.append(to_raw(arr))
    raw_contents.extend(raw)


def from_raw(raw: bytes, datatype: str, shape: Sequence[int], tensor: str) -> np.ndarray:
    """Decode raw bytes of a tensor; checks the length against the shape."""
    shape = _check_shape(shape, tensor)
    n = _count(shape)
    dtype = numpy_dtype(datatype, tensor)
    if dtype is None:
        items, pos, size = [], 0, len(raw)
        while pos < size:
            if pos + 4 > size:
                raise TensorDecodeError(f"tensor {tensor!r}: BYTES data ends inside a length prefix")
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > size:
                raise TensorDecodeError(f"tensor {tensor!r}: BYTES element of {length} bytes runs past the data")
            items.append(bytes(raw[pos : pos + length]))
            pos += length
        if len(items) != n:
            raise TensorDecodeError(
                f"tensor {tensor!r}: shape {list(shape)} needs {n} BYTES elements, got {len(items)}"
            )
        return _bytes_array(items, shape)
    want = n * dtype.itemsize
    if len(raw) != want:
        raise TensorDecodeError(
            f"tensor {tensor!r}: shape {list(shape)} of {datatype} needs {want} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


# -- typed protobuf contents --------------------------------------------------------------
def fill_contents(contents: pb.InferTensorContents, arr: np.ndarray, datatype: str) -> None:
    """Write ``arr`` into the typed field of ``contents`` (not for FP16, which is raw only)."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorDecodeError(f"datatype {datatype} can only be sent as raw contents")
    values = _as_bytes_list(arr) if datatype == BYTES else arr.ravel().tolist()
    getattr(contents, field).extend(values)


def from_contents(contents: pb.InferTensorContents, datatype: str, shape: Sequence[int], tensor: str) -> np.ndarray:
    """Decode the typed contents of a tensor; checks the element count against the shape."""
    shape = _check_shape(shape, tensor)
    n = _count(shape)
    dtype = numpy_dtype(datatype, tensor)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorDecodeError(f"tensor {tensor!r}: datatype {datatype} must come as raw contents")
    values = getattr(contents, field)
    if len(values) != n:
        others = [f.name for f, _ in contents.ListFields() if f.name != field]
        extra = f" (data came in {others} instead)" if others else ""
        raise TensorDecodeError(
            f"tensor {tensor!r}: shape {list(shape)} of {datatype} needs {n} values in {field}, "
            f"got {len(values)}{extra}"
        )
    if dtype is None:
        return _bytes_array(list(values), shape)
    if dtype.kind in "iu":
        wide = np.array(values, dtype=np.uint64 if field == "uint64_contents" else np.int64)
        _check_range(wide, dtype, tensor)
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


# -- JSON (REST) ----------------------------------------------------------------------------
def to_json_tensor(name: str, arr: np.ndarray) -> dict[str, Any]:
    """A v2 REST tensor: ``{"name", "shape", "datatype", "data"}`` with flat row-major data."""
    datatype = datatype_of(arr.dtype)
    if datatype == BYTES:
        data: list[Any] = [b.decode("utf-8", errors="replace") for b in _as_bytes_list(arr)]
    else:
        data = arr.ravel().tolist()
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def from_json_tensor(obj: Any, where: str = "tensor") -> tuple[str, np.ndarray]:
    """Decode a v2 REST tensor object; returns ``(name, array)``."""
    if not isinstance(obj, dict):
        raise TensorDecodeError(f"{where} is a {type(obj).__name__}, expected an object")
    data = obj.get("data")
    name, datatype, shape = tensor_header(obj, where)
    if data is None:
        raise TensorDecodeError(f"tensor {name!r} has no 'data' (and no binary_data_size parameter)")
    return name, json_data_to_array(data, datatype, shape, name)


def json_data_to_array(data: Any, datatype: str, shape: Sequence[int], tensor: str) -> np.ndarray:
    """Turn JSON ``data`` (flat or nested list) into an array of ``datatype`` and ``shape``."""
    shape = _check_shape(shape, tensor)
    n = _count(shape)
    dtype = numpy_dtype(datatype, tensor)
    if not isinstance(data, list):
        raise TensorDecodeError(f"tensor {tensor!r}: 'data' is a {type(data).__name__}, expected a list")
    try:
        parsed = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise TensorDecodeError(f"tensor {tensor!r}: 'data' is not a regular array: {e}") from None
    if dtype is not None and dtype.kind in "iu" and parsed.dtype.kind in "fO":
        parsed = _exact_ints(data, parsed, dtype, tensor)
    if parsed.size != n:
        raise TensorDecodeError(f"tensor {tensor!r}: shape {list(shape)} needs {n} values, got {parsed.size}")
    if n and parsed.dtype.kind not in _JSON_KINDS.get(datatype, "iub"):
        raise TensorDecodeError(
            f"tensor {tensor!r} is declared {datatype} but its data holds {parsed.dtype.kind!r}-kind values "
            f"(numpy {parsed.dtype}), e.g. {parsed.ravel()[0]!r}"
        )
    if dtype is None:
        items = parsed.ravel().tolist()
        if not all(isinstance(v, str) for v in items):
            raise TensorDecodeError(
                f"tensor {tensor!r} is declared BYTES but its data holds values that are not strings"
            )
        return _bytes_array([v.encode("utf-8") for v in items], shape)
    _check_range(parsed, dtype, tensor)
    with np.errstate(over="ignore"):  # floats beyond FP16/FP32 become inf, as on every v2 server
        return parsed.astype(dtype, copy=False).reshape(shape)


def _exact_ints(data: list, parsed: np.ndarray, dtype: np.dtype, tensor: str) -> np.ndarray:
    """Integers beyond int64 (UINT64's upper half), which numpy reads as floats (losing digits) or objects."""
    exact = np.array(data, dtype=object)
    flat = exact.ravel().tolist()
    if not flat or not all(type(v) is int for v in flat):
        return parsed  # not all integers: the datatype check says so
    info = np.iinfo(dtype)
    bad = next((v for v in flat if not info.min <= v <= info.max), None)
    if bad is not None:
        raise TensorDecodeError(
            f"tensor {tensor!r}: value {bad} is outside the range of {datatype_of(dtype)} [{info.min}, {info.max}]"
        )
    return np.array(flat, dtype=dtype).reshape(exact.shape)


# -- REST bodies, with Triton's binary tensor data extension ---------------------------------


def tensor_header(obj: dict[str, Any], where: str) -> tuple[str, str, list[int]]:
    name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise TensorDecodeError(
            f"{where} needs string 'name' and 'datatype' and a list 'shape', got keys {sorted(obj)}"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorDecodeError(f"tensor {name!r}: shape {shape} is not a list of integers")
    return name, datatype, shape
