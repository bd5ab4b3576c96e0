"""Tensors of the KServe v2 / Open Inference Protocol: datatypes and the three encodings.

A v2 tensor is ``name``, ``datatype`` (``"FP32"``, ``"INT64"``, ``"BYTES"``...), ``shape``
and data, carried as

- raw little-endian bytes (``raw_input_contents`` / ``raw_output_contents`` in gRPC),
- typed repeated fields (``InferTensorContents`` in gRPC), or
- a JSON list (REST), flat or nested, row-major.

Client and server share these functions.  Everything that comes off the network is
checked (datatype known, shape non-negative, element count and byte length equal to
what the shape says) and a mismatch raises :class:`TensorDecodeError` naming the tensor;
no bytes are ever unpickled.
"""

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
    return shape


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
            items.append(bytes(raw[pos:pos + length]))
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
    name = obj.get("name")
    datatype = obj.get("datatype")
    shape = obj.get("shape")
    data = obj.get("data")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise TensorDecodeError(f"{where} needs string 'name' and 'datatype' and a list 'shape', got keys {sorted(obj)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorDecodeError(f"tensor {name!r}: shape {shape} is not a list of integers")
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
    if parsed.size != n:
        raise TensorDecodeError(f"tensor {tensor!r}: shape {list(shape)} needs {n} values, got {parsed.size}")
    if n and parsed.dtype.kind not in _JSON_KINDS.get(datatype, "iub"):
        raise TensorDecodeError(
            f"tensor {tensor!r} is declared {datatype} but its data holds {parsed.dtype.kind!r}-kind values "
            f"(numpy {parsed.dtype}), e.g. {parsed.ravel()[0]!r}"
        )
    if dtype is None:
        return _bytes_array([v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in parsed.ravel().tolist()], shape)
    return parsed.astype(dtype, copy=False).reshape(shape)
