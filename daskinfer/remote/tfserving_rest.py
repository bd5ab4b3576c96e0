"""TensorFlow Serving REST predict client, with aiohttp.

Needs the ``http`` extra (``pip install daskinfer[http]``).

``POST /v1/models/{name}[/versions/{v}]:predict`` in either format:

- ``"row"``: ``{"instances": [...]}`` -> ``{"predictions": [...]}``, one entry per row
  (a value for a single input/output, an object keyed by name for several);
- ``"columnar"``: ``{"inputs": {name: [...]}}`` -> ``{"outputs": value or {name: value}}``.

The signature is read once from ``GET /v1/models/{name}[/versions/{v}]/metadata``
(``signature_def``); when the service has no metadata endpoint nothing is checked
and outputs keep the dtype JSON gives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from daskinfer.remote import v2
from daskinfer.remote.base import ModelSignature
from daskinfer.remote.kserve_rest import HttpClient, snippet
from daskinfer.tensors import TensorSpec

TF_TO_V2 = {
    "DT_FLOAT": "FP32",
    "DT_DOUBLE": "FP64",
    "DT_HALF": "FP16",
    "DT_INT8": "INT8",
    "DT_INT16": "INT16",
    "DT_INT32": "INT32",
    "DT_INT64": "INT64",
    "DT_UINT8": "UINT8",
    "DT_UINT16": "UINT16",
    "DT_UINT32": "UINT32",
    "DT_UINT64": "UINT64",
    "DT_BOOL": "BOOL",
    "DT_STRING": "BYTES",
}
FORMATS = ("row", "columnar")


def _tf_spec(name: str, info: Mapping[str, Any]) -> TensorSpec:
    datatype = TF_TO_V2.get(str(info.get("dtype")))
    dims = None
    shape = info.get("tensor_shape") or {}
    if not shape.get("unknown_rank") and "dim" in shape:
        dims = tuple(None if int(d.get("size", -1)) < 0 else int(d["size"]) for d in shape["dim"])
        if dims:
            dims = (None, *dims[1:])
    dtype = None if datatype in (None, v2.BYTES) else v2.V2_TO_NUMPY[datatype]
    return TensorSpec(name, dtype, dims or None)


class TFServingRestClient(HttpClient):
    """TF Serving REST predict client for one model.

    Options
    -------
    tfserving_format : {"row", "columnar"}
        Request format (default "row": ``instances``).
    signature_name : str, optional
        Signature to call and to read from the metadata (default ``serving_default``).
    headers, tls_ca, tls_cert, tls_key
        As for :class:`~daskinfer.remote.kserve_rest.KServeRestClient`.
    """

    protocol = "tfserving-rest"
    api_prefix = "/v1"

    def __init__(self, url: str, model_name: str, model_version: str = "", **options: Any):
        super().__init__(url, model_name, model_version, **options)
        self.format = options.get("tfserving_format") or "row"
        if self.format not in FORMATS:
            raise ValueError(f"tfserving_format must be one of {FORMATS}, got {self.format!r}")
        self.signature_name = options.get("signature_name") or None

    async def ready(self, timeout: float) -> bool:
        status, body = await self.request("ModelStatus", "GET", self.model_path, timeout)
        if status != 200:
            return False
        try:
            obj = self.parse_json("ModelStatus", status, body)
            states = [s.get("state") for s in obj.get("model_version_status", [])]
        except Exception:
            return False
        return not states or "AVAILABLE" in states

    async def metadata(self, timeout: float) -> ModelSignature:
        call = "GetModelMetadata"
        status, body = await self.request(call, "GET", self.model_path + "/metadata", timeout)
        if status in (404, 405, 501):  # no metadata endpoint: nothing is checked
            self.signature = ModelSignature()
            return self.signature
        obj = self.parse_json(call, status, body)
        try:
            defs = obj["metadata"]["signature_def"]["signature_def"]
            sig_name = self.signature_name or "serving_default"
            sd = defs[sig_name]
            inputs, outputs = [], []
            inputs = [_tf_spec(name, info) for name, info in sorted(sd.get("inputs", {}).items())]
            outputs = [_tf_spec(name, info) for name, info in sorted(sd.get("outputs", {}).items())]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise self.bad_answer(
                call, f"malformed metadata: no usable signature_def ({type(e).__name__}: {e})"
            ) from None
        versions = (
            [str(obj.get("model_spec", {}).get("version", ""))] if isinstance(obj.get("model_spec"), dict) else []
        )
        self.signature = ModelSignature(inputs or None, outputs or None, [v for v in versions if v], "tensorflow")
        return self.signature

    def _output_names(self) -> list[str]:
        if self.signature and self.signature.outputs:
            return [s.name for s in self.signature.outputs]
        return []

    async def infer(
        self, block: Mapping[str, np.ndarray], timeout: float, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        call = "Predict"
        rows = len(next(iter(block.values())))
        names = list(block)
        if self.format == "row":
            if len(names) == 1:
                instances: Any = block[names[0]].tolist()
            else:
                cols = {k: v.tolist() for k, v in block.items()}
                instances = [{k: cols[k][i] for k in names} for i in range(rows)]
            body: dict[str, Any] = {"instances": instances}
        else:
            body = {"inputs": {k: v.tolist() for k, v in block.items()}}
        if self.signature_name:
            body["signature_name"] = self.signature_name
        status, raw = await self.request(call, "POST", self.model_path + ":predict", timeout, body)
        obj = self.parse_json(call, status, raw)
        key = "predictions" if self.format == "row" else "outputs"
        if not isinstance(obj, dict) or key not in obj:
            raise self.bad_answer(call, f"malformed response: expected an object with {key!r}, got {snippet(raw)}")
        try:
            out = self._decode(obj[key], rows)
        except v2.TensorDecodeError as e:
            raise self.bad_answer(call, f"malformed response: {e}") from None
        return self.check_outputs(out, rows, call)

    def _decode(self, value: Any, rows: int) -> dict[str, np.ndarray]:
        declared = self._output_names()
        if self.format == "row":
            if not isinstance(value, list):
                raise v2.TensorDecodeError(f"'predictions' is a {type(value).__name__}, expected a list of {rows} rows")
            if value and isinstance(value[0], dict):
                if not all(isinstance(r, dict) for r in value):
                    raise v2.TensorDecodeError("'predictions' mixes objects and values")
                keys = list(value[0])
                cols = {k: [r.get(k) for r in value] for k in keys}
            else:
                cols = {declared[0] if len(declared) == 1 else "output": value}
        else:
            if isinstance(value, dict):
                cols = dict(value)
            else:
                cols = {declared[0] if len(declared) == 1 else "output": value}
        out = {}
        for name, data in cols.items():
            if not isinstance(data, list):
                raise v2.TensorDecodeError(
                    f"output {name!r} is a {type(data).__name__}, expected a list with one entry per row"
                )
            out[name] = self._array(name, data)
        return out

    def _array(self, name: str, data: list[Any]) -> np.ndarray:
        try:
            parsed = np.asarray(data)
        except ValueError as e:
            raise v2.TensorDecodeError(f"output {name!r} is not a regular array: {e}") from None
        declared = {s.name: s for s in (self.signature.outputs or [])} if self.signature else {}
        spec = declared.get(name)
        if spec is None or spec.dtype is None:
            if parsed.dtype.kind not in "biufUS":
                raise v2.TensorDecodeError(f"output {name!r} holds values of numpy dtype {parsed.dtype}")
            return parsed
        return v2.json_data_to_array(data, v2.datatype_of(spec.dtype), parsed.shape, name)
