"""The REST form of the KServe v2 protocol: a request body (JSON, or Triton's binary tensor data
extension: a JSON header of ``Inference-Header-Content-Length`` bytes and raw tensors after it)
decoded and checked, and a response body encoded (see :mod:`daskinfer.remote.v2`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from daskinfer.remote.v2_tensors import (
    INFERENCE_HEADER,
    TensorDecodeError,
    datatype_of,
    from_json_tensor,
    from_raw,
    tensor_header,
    to_json_tensor,
    to_raw,
)

_fast_json = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


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
    """Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused, as strict parsers do.

    msgspec parses (about 7x faster than the standard library here); what it refuses is parsed
    again by the standard library, which accepts what it accepted before (UTF-16 or UTF-32 bodies,
    integers past 64 bits) and otherwise says what is wrong in its own words."""
    try:
        return _fast_json(data)
    except msgspec.DecodeError:
        pass
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
            name, datatype, shape = tensor_header(t, where)
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
    head = _json_encode(resp)  # every float is finite here: check_json_finite refused the others
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)
