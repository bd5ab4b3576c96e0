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

The tensors and their encodings live in :mod:`daskinfer.remote.v2_tensors`, the REST bodies in
:mod:`daskinfer.remote.v2_rest`; this module gathers both.
"""

from __future__ import annotations

from daskinfer.remote.v2_rest import (
    RestInferRequest,
    check_json_finite,
    decode_rest_request,
    encode_rest_response,
    timeout_parameter,
)
from daskinfer.remote.v2_tensors import (
    BYTES,
    CONTENTS_FIELD,
    INFERENCE_HEADER,
    MAX_ELEMENTS,
    V2_TO_NUMPY,
    TensorDecodeError,
    add_raw_tensors,
    datatype_of,
    fill_contents,
    from_contents,
    from_json_tensor,
    from_raw,
    json_data_to_array,
    numpy_dtype,
    to_json_tensor,
    to_raw,
)

__all__ = [
    "BYTES",
    "CONTENTS_FIELD",
    "INFERENCE_HEADER",
    "MAX_ELEMENTS",
    "RestInferRequest",
    "TensorDecodeError",
    "V2_TO_NUMPY",
    "add_raw_tensors",
    "check_json_finite",
    "datatype_of",
    "decode_rest_request",
    "encode_rest_response",
    "fill_contents",
    "from_contents",
    "from_json_tensor",
    "from_raw",
    "json_data_to_array",
    "numpy_dtype",
    "timeout_parameter",
    "to_json_tensor",
    "to_raw",
]
