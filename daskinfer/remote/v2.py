"""Tensors of the KServe v2 / Open Inference Protocol: datatypes and the three encodings.

A v2 tensor is ``name``, ``datatype`` (``"FP32"``, ``"INT64"``, ``"BYTES"``...), ``shape``
and data, carried as

- raw little-endian bytes (``raw_input_contents`` / ``raw_output_contents`` in gRPC),
- typed repeated fields (``InferTensorContents`` in gRPC), or
- a JSON list (REST), flat or nested, row-major.

Over REST, Triton's *binary tensor data* extension carries tensors as raw bytes after
the JSON: the request or response body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by each binary tensor in order, each
tensor marked with ``"parameters": {"binary_data_size": n}``
(:func:`decode_rest_request`, :func:`encode_rest_response`).

Client and server share these functions.  Everything that comes off the network is
checked (datatype known, shape non-negative and not absurdly large, element count and
byte length equal to what the shape says, integers within their datatype's range) and
any mismatch raises :class:`TensorDecodeError` naming the tensor: that is the only
exception the decoders raise for bad input.  No bytes are ever unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    name, datatype, shape = _tensor_header(obj, where)
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
@dataclass
class RestInferRequest:
    """A decoded v2 REST inference request.

    Attributes
    ----------
    inputs : dict of str to ndarray
        The input tensors by name.
    id : str, optional
        The request's ``id``, echoed in the response.
    outputs : list of str, optional
        Requested output names (``None``: all).
    binary_outputs, json_outputs : set of str
        Outputs to send as binary data, or as JSON (their ``parameters.binary_data``).
    binary_default : bool
        Send unlisted outputs as binary data (top-level ``parameters.binary_data_output``).
    parameters : dict
        The request's top-level parameters.
    """

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    json_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` goes back as binary data."""
        return output in self.binary_outputs or (self.binary_default and output not in self.json_outputs)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise TensorDecodeError(f"{where}: 'parameters' is a {type(params).__name__}, expected an object")
    return params


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise TensorDecodeError(f"{where}: parameter {key!r} is {value!r}, expected true or false")
    return value


def _header_length(value: Any, size: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise TensorDecodeError(f"{INFERENCE_HEADER} is {value!r}, expected a number of bytes") from None
    if not 0 <= n <= size:
        raise TensorDecodeError(f"{INFERENCE_HEADER} is {n} but the body has {size} bytes")
    return n


def _refuse_constant(name: str) -> Any:
    raise TensorDecodeError(
        f"the request body holds {name}, which JSON does not allow (RFC 8259); send non-finite values as "
        f"binary tensor data ({INFERENCE_HEADER}) or over gRPC"
    )


def _load_json(data: bytes) -> Any:
    """Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused, as strict parsers do."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except TensorDecodeError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise TensorDecodeError(f"the request body is not JSON: {e}") from None


def timeout_parameter(params: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds), in seconds; ``None`` when absent.

    Raises :class:`TensorDecodeError` when it is not a positive integer.
    """
    value = params.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TensorDecodeError(f"parameter 'timeout' is {value!r}, expected a positive number of microseconds")
    return value / 1e6


def check_json_finite(name: str, arr: np.ndarray) -> None:
    """Raise :class:`TensorDecodeError` if a float output to be sent as JSON holds NaN or infinity.

    JSON has no such numbers; strict parsers (Go's ``encoding/json``, Jackson by default) refuse
    bare ``NaN``.  The binary tensor data extension and gRPC carry them.
    """
    if arr.dtype.kind in "fc" and arr.size and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise TensorDecodeError(
            f"output {name!r} holds {bad} NaN or infinite value(s), which JSON cannot carry; ask for it as binary "
            f'data ({{"outputs": [{{"name": "{name}", "parameters": {{"binary_data": true}}}}]}}) or call over gRPC'
        )


def decode_rest_request(body: bytes, header_length: Any = None) -> RestInferRequest:
    """Decode a v2 REST inference request body (JSON, or JSON plus binary tensor data).

    Parameters
    ----------
    body : bytes
        The whole HTTP body.
    header_length : str or int, optional
        The ``Inference-Header-Content-Length`` header: the JSON part's length; the rest
        of the body is the inputs' binary data in order.

    Raises
    ------
    TensorDecodeError
        For anything that is not a well-formed request, naming the part at fault.
    """
    n = _header_length(header_length, len(body))
    obj = _load_json(body if n is None else body[:n])
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list):
        raise TensorDecodeError("expected a JSON object with an 'inputs' list")
    binary = memoryview(body)[len(body) if n is None else n :]
    pos = 0
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(obj["inputs"]):
        where = f"input {i}"
        if not isinstance(t, dict):
            raise TensorDecodeError(f"{where} is a {type(t).__name__}, expected an object")
        size = _parameters(t, where).get("binary_data_size")
        if size is None:
            name, arr = from_json_tensor(t, where)
        else:
            name, datatype, shape = _tensor_header(t, where)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorDecodeError(f"tensor {name!r}: binary_data_size is {size!r}, expected a byte count")
            if pos + size > len(binary):
                raise TensorDecodeError(
                    f"tensor {name!r}: binary_data_size {size} runs past the {len(binary)} bytes of binary data"
                )
            arr = from_raw(bytes(binary[pos : pos + size]), datatype, shape, name)
            pos += size
        if name in inputs:
            raise TensorDecodeError(f"input {name!r} is given twice")
        inputs[name] = arr
    if pos != len(binary):
        raise TensorDecodeError(f"the body has {len(binary) - pos} bytes of binary data that no input claims")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorDecodeError(f"'id' is a {type(request_id).__name__}, expected a string")
    params = _parameters(obj, "the request")
    req = RestInferRequest(
        inputs, request_id, parameters=params, binary_default=_flag(params, "binary_data_output", "the request")
    )
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise TensorDecodeError(f"'outputs' is a {type(outputs).__name__}, expected a list")
        names = []
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise TensorDecodeError(f"output {i}: expected an object with a string 'name'")
            names.append(o["name"])
            oparams = _parameters(o, f"output {o['name']!r}")
            if "binary_data" in oparams:
                (
                    req.binary_outputs if _flag(oparams, "binary_data", f"output {o['name']!r}") else req.json_outputs
                ).add(o["name"])
        req.outputs = names or None
    return req


def _tensor_header(obj: dict[str, Any], where: str) -> tuple[str, str, list[int]]:
    name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise TensorDecodeError(
            f"{where} needs string 'name' and 'datatype' and a list 'shape', got keys {sorted(obj)}"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorDecodeError(f"tensor {name!r}: shape {shape} is not a list of integers")
    return name, datatype, shape


def encode_rest_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    binary: Callable[[str], bool] = lambda name: False,
) -> tuple[bytes, int | None]:
    """The body of a v2 REST inference response, and its JSON length when it carries binary data.

    ``binary(name)`` says which outputs go as binary data (Triton's extension); the
    length is then the ``Inference-Header-Content-Length`` header's value.  An output
    to be sent as JSON that holds NaN or infinity raises :class:`TensorDecodeError`
    (:func:`check_json_finite`): the JSON is strict.
    """
    tensors, raw = [], []
    for name, arr in outputs.items():
        if binary(name):
            data = to_raw(arr)
            tensors.append(
                {
                    "name": name,
                    "datatype": datatype_of(arr.dtype),
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            )
            raw.append(data)
        else:
            check_json_finite(name, arr)
            tensors.append(to_json_tensor(name, arr))
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request_id is not None:
        resp["id"] = request_id
    head = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode()
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)
