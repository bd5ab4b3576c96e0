"""KServe v2 / Open Inference Protocol client over REST (JSON tensors), with aiohttp.

Needs the ``http`` extra (``pip install daskinfer[http]``).

Endpoints: ``GET /v2/health/ready``, ``GET /v2/models/{name}[/versions/{v}]`` (metadata),
``GET /v2/models/{name}[/versions/{v}]/ready`` and
``POST /v2/models/{name}[/versions/{v}]/infer``.  One ``aiohttp.ClientSession`` per
event loop; a response that is not JSON, or whose tensors do not match their own
shape and datatype, becomes a clear :class:`~daskinfer.exceptions.RemoteModelError`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from daskinfer.remote import v2
from daskinfer.remote.base import ModelSignature, RemoteClient
from daskinfer.tensors import TensorSpec

RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})


def ssl_context(options: Mapping[str, Any]) -> ssl.SSLContext | None:
    """A client SSL context from ``tls_ca``/``tls_cert``/``tls_key`` PEM bytes (None: defaults)."""
    ca, cert, key = options.get("tls_ca"), options.get("tls_cert"), options.get("tls_key")
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(cadata=ca.decode() if isinstance(ca, bytes) else ca)
    if cert:
        import os
        import tempfile

        # ssl loads a client certificate from files only
        with tempfile.TemporaryDirectory() as d:
            cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            with open(cpath, "wb") as f:
                f.write(cert)
            with open(kpath, "wb") as f:
                f.write(key or b"")
            ctx.load_cert_chain(cpath, kpath if key else None)
    return ctx


def snippet(body: bytes, limit: int = 80) -> str:
    """The start of a response body, for error messages."""
    return repr(body[:limit]) + ("..." if len(body) > limit else "")


class HttpClient(RemoteClient):
    """Shared plumbing of the REST clients: one session, JSON in and out, error mapping."""

    api_prefix = ""  # "/v2" (KServe), "/v1" (TF Serving)

    @property
    def model_path(self) -> str:
        """``{api_prefix}/models/{name}[/versions/{version}]``, quoted."""
        p = f"{self.api_prefix}/models/{quote(self.model_name, safe='')}"
        if self.model_version:
            p += f"/versions/{quote(self.model_version, safe='')}"
        return p

    def __init__(self, url: str, model_name: str, model_version: str = "", **options: Any):
        super().__init__(url.rstrip("/"), model_name, model_version, **options)
        self._session: aiohttp.ClientSession | None = None
        self._headers = {str(k): str(v) for k, v in (options.get("headers") or {}).items()}

    async def open(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=int(self.options.get("max_inflight") or 100), ssl=ssl_context(self.options) or True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # the per-call timeout is given to each request; no session-wide limit
            timeout=aiohttp.ClientTimeout(total=None),
            read_bufsize=2**20,
        )

    async def aclose(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            await s.close()

    async def request(self, call: str, method: str, path: str, timeout: float, body: Any = None) -> tuple[int, bytes]:
        """Send one request; return status and body.  Connection problems are retryable errors."""
        if self._session is None:
            await self.open()
        assert self._session is not None
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = None if data is None else {"Content-Type": "application/json"}
        try:
            async with self._session.request(
                method, self.url + path, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status, await resp.read()
        except asyncio.TimeoutError:
            raise self.error(call, f"no answer within {timeout:.3g}s", retryable=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as e:
            raise self.error(call, f"connection failed: {type(e).__name__}: {e}", retryable=True) from None

    def parse_json(self, call: str, status: int, body: bytes) -> Any:
        """JSON of a 2xx body; an error for other statuses.

        408/429/502/503/504 say the service is unavailable (retried), other 5xx that it
        failed (retried ``server_error_retries`` times), other statuses that the request
        was refused (not retried; no news of the service's health).
        """
        if status // 100 != 2:
            why = body.decode("utf-8", errors="replace").strip()
            try:
                obj = json.loads(body)
                if isinstance(obj, dict) and "error" in obj:
                    why = str(obj["error"])
            except ValueError:
                pass
            if status in RETRYABLE_STATUS:
                fault = "unavailable"
            elif status >= 500:
                fault = "server"
            else:
                fault = "request"
            raise self.error(call, f"HTTP {status}: {why[:500] or '(empty body)'}", fault=fault)
        try:
            return json.loads(body)
        except ValueError:
            raise self.bad_answer(call, f"malformed response: the body is not JSON: {snippet(body)}") from None


class KServeRestClient(HttpClient):
    """KServe v2 REST client for one model.

    Options
    -------
    tls_ca, tls_cert, tls_key : bytes, optional
        PEM root certificates and client certificate/key for ``https://`` services.
    headers : dict, optional
        HTTP headers sent with every request.
    """

    protocol = "kserve-rest"
    api_prefix = "/v2"

    async def ready(self, timeout: float) -> bool:
        status, _ = await self.request("ModelReady", "GET", self.model_path + "/ready", timeout)
        return status == 200

    async def server_ready(self, timeout: float) -> bool:
        status, _ = await self.request("ServerReady", "GET", "/v2/health/ready", timeout)
        return status == 200

    async def metadata(self, timeout: float) -> ModelSignature:
        call = "ModelMetadata"
        status, body = await self.request(call, "GET", self.model_path, timeout)
        obj = self.parse_json(call, status, body)
        try:
            sig = ModelSignature(
                inputs=[_spec(t) for t in obj.get("inputs") or []] or None,
                outputs=[_spec(t) for t in obj.get("outputs") or []] or None,
                versions=[str(v) for v in obj.get("versions") or []],
                platform=str(obj.get("platform", "")),
            )
        except (v2.TensorDecodeError, AttributeError, TypeError, KeyError) as e:
            raise self.bad_answer(call, f"malformed metadata: {type(e).__name__}: {e}") from None
        self.signature = sig
        return sig

    async def infer(
        self, block: Mapping[str, np.ndarray], timeout: float, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        call = "ModelInfer"
        rows = len(next(iter(block.values())))
        try:
            body: dict[str, Any] = {"inputs": [v2.to_json_tensor(k, v) for k, v in block.items()]}
        except v2.TensorDecodeError as e:
            raise self.error(call, f"cannot encode the request: {e}") from None
        if request_id:
            body["id"] = request_id
        status, raw = await self.request(call, "POST", self.model_path + "/infer", timeout, body)
        obj = self.parse_json(call, status, raw)
        if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), list):
            raise self.bad_answer(
                call, f"malformed response: expected an object with an 'outputs' list, got {snippet(raw)}"
            )
        if request_id and obj.get("id") not in (None, "", request_id):
            raise self.bad_answer(call, f"the response is for request id {obj.get('id')!r}, expected {request_id!r}")
        out = {}
        try:
            for i, t in enumerate(obj["outputs"]):
                name, arr = v2.from_json_tensor(t, f"output {i}")
                out[name] = arr
        except v2.TensorDecodeError as e:
            raise self.bad_answer(call, f"malformed response: {e}") from None
        return self.check_outputs(out, rows)


def _spec(t: Any) -> TensorSpec:
    name, datatype, shape = t["name"], t["datatype"], t.get("shape")
    dtype = None if datatype == v2.BYTES else v2.numpy_dtype(datatype, name)
    dims = tuple(None if int(d) < 0 else int(d) for d in shape) if shape else None
    if dims:
        dims = (None, *dims[1:])
    return TensorSpec(str(name), dtype, dims)
