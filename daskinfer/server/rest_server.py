"""KServe v2 REST front end (aiohttp) of the model server and the gateway.

Routes (Triton's, so that ``tritonclient.http`` works unchanged)::

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              200 when live / ready, else 503
    GET  /v2/models/stats                               statistics of every model
    POST /v2/repository/index                           every model with its state
    GET  /v2/models/{name}[/versions/{v}]               model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready         200 when ready, else 503
    GET  /v2/models/{name}[/versions/{v}]/config        Triton model configuration
    GET  /v2/models/{name}[/versions/{v}]/stats         Triton statistics
    POST /v2/models/{name}[/versions/{v}]/infer         inference, JSON or binary tensor data
    GET  /metrics                                       Prometheus metrics (with prometheus_client installed)

Inference takes JSON tensors and Triton's binary tensor data extension
(``Inference-Header-Content-Length``) and answers in kind.  The JSON is strict, as
strict parsers (Go's ``encoding/json``, Jackson by default) want it: ``NaN`` and
``Infinity`` in a request are refused with 400, and an output asked for as JSON that
holds NaN or infinity is refused with 400 naming the output and saying to ask for it as
binary data (``"parameters": {"binary_data": true}``), which carries any value, as gRPC
does.  (Triton writes bare ``NaN``, which strict parsers reject; MLServer and KServe
write ``null``, which a typed parser reads as 0 without a word.)  Every error, unknown routes
included, is ``{"error": "..."}`` with the status of :mod:`daskinfer.server.errors`;
503 answers to a full server carry ``Retry-After``.  With a certificate the port speaks
TLS only, and with client roots it requires client certificates (mutual TLS).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import ssl
from typing import Any

from aiohttp import web

from daskinfer import settings
from daskinfer.remote import v2
from daskinfer.server.errors import BadRequest, ServerBindError, ServiceError, internal_error
from daskinfer.server.service import V2Model, V2Service
from daskinfer.tracing import TRACEPARENT

logger = logging.getLogger(__name__)

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj).encode(), status=status, content_type="application/json")


def error_response(e: ServiceError) -> web.Response:
    """The JSON answer to a failed call (``Retry-After`` when the caller should come back)."""
    resp = _json({"error": e.message}, e.http_status)
    if e.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
    return resp


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as a JSON body: service errors, aiohttp's own (404, 405, 413), and bugs."""
    try:
        return await handler(request)
    except ServiceError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and e.text != f"{e.status}: {e.reason}" else e.reason
        resp = _json(
            {"error": f"{message}: {request.method} {request.path}" if e.status in (404, 405) else message}, e.status
        )
        for key in ("Allow",):
            if key in e.headers:
                resp.headers[key] = e.headers[key]
        return resp
    except Exception as e:
        return error_response(internal_error(f"{request.method} {request.path}", type(e).__name__, str(e)))


def _timeout(params: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds), in seconds."""
    try:
        return v2.timeout_parameter(params)
    except v2.TensorDecodeError as e:
        raise BadRequest(str(e)) from None


class RestApp:
    """aiohttp handlers over a :class:`~daskinfer.server.service.V2Service`."""

    def __init__(self, service: V2Service, server_name: str = "daskinfer", server_version: str = ""):
        self.service = service
        self.server_name = server_name
        self.server_version = server_version

    def application(self, max_message_size: int) -> web.Application:
        app = web.Application(client_max_size=max_message_size, middlewares=[json_errors])
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2/models/stats", self.all_statistics)
        r.add_post("/v2/repository/index", self.repository_index)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_get(base + "/stats", self.model_statistics)
            r.add_post(base + "/infer", self.infer)
        if settings.metrics_enabled():
            from daskinfer.server.metrics import MetricsEndpoint

            endpoint = MetricsEndpoint(self.service)

            async def metrics(request: web.Request) -> web.Response:
                resp = web.Response(body=endpoint.render())
                resp.headers["Content-Type"] = endpoint.content_type
                return resp

            r.add_get("/metrics", metrics)
        return app

    def _model(self, request: web.Request) -> V2Model:
        return self.service.get(request.match_info["name"], request.match_info.get("version", ""))

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(
            {
                "name": self.server_name,
                "version": self.server_version,
                "extensions": ["binary_tensor_data", "model_configuration", "model_repository", "statistics"],
            }
        )

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return _json({"ready": self.service.ready}, 200 if self.service.ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(self._model(request).metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        return _json({"ready": self.service.ready}, 200 if self.service.ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(self._model(request).config())

    async def model_statistics(self, request: web.Request) -> web.Response:
        return _json(self.service.statistics(request.match_info["name"], request.match_info.get("version", "")))

    async def all_statistics(self, request: web.Request) -> web.Response:
        return _json(self.service.statistics())

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        ready_only = False
        if body.strip():
            try:
                options = json.loads(body)
            except (ValueError, RecursionError) as e:
                raise BadRequest(f"the repository index request is not JSON: {e}") from None
            if not isinstance(options, dict):
                raise BadRequest("the repository index request must be a JSON object")
            ready_only = options.get("ready") is True
        index = self.service.repository_index()
        return _json([m for m in index if m["state"] == "READY"] if ready_only else index)

    async def infer(self, request: web.Request) -> web.Response:
        model = self._model(request)
        try:
            req = v2.decode_rest_request(await request.read(), request.headers.get(v2.INFERENCE_HEADER))
        except v2.TensorDecodeError as e:
            raise BadRequest(f"model {model.name!r}: {e}") from None
        out = await self.service.infer(
            model, req.inputs, req.outputs, _timeout(req.parameters), traceparent=request.headers.get(TRACEPARENT)
        )
        try:
            body, header_length = v2.encode_rest_response(model.name, model.version, req.id, out, req.wants_binary)
        except v2.TensorDecodeError as e:  # NaN or infinity in an output asked for as JSON
            raise BadRequest(f"model {model.name!r}: {e}") from None
        if header_length is None:
            return web.Response(body=body, content_type="application/json")
        resp = web.Response(body=body, content_type="application/octet-stream")
        resp.headers[v2.INFERENCE_HEADER] = str(header_length)
        return resp


async def start_rest_server(
    service: V2Service,
    host: str,
    port: int,
    *,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str = "daskinfer",
    server_version: str = "",
    share_port: bool = False,
) -> tuple[web.AppRunner, int]:
    """Start the REST server on ``host:port`` (0: a free port); return its runner and port.
    ``share_port``: bind with ``SO_REUSEPORT`` (other processes serve the same port).

    Raises :class:`~daskinfer.server.errors.ServerBindError` when the address is taken.
    """
    app = RestApp(service, server_name, server_version).application(max_message_size)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True, reuse_port=share_port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ServerBindError(f"cannot bind the REST front end to {host}:{port}: {reason}") from None
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            bound = int(addr[1])
            break
    return runner, bound
