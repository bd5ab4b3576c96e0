"""KServe v2 REST front end of the model server (aiohttp; needs ``daskinfer[http]``).

Routes::

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              200 when live / ready, else 503
    GET  /v2/models/{name}[/versions/{v}]               model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready         200 when ready, else 503
    POST /v2/models/{name}[/versions/{v}]/infer         inference with JSON tensors

Errors are ``{"error": "..."}`` with 400 (bad request), 404 (unknown model),
503 (queue full, not ready) or 500 (the model failed).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from daskinfer.exceptions import RequestError
from daskinfer.remote import v2
from daskinfer.server.batcher import ServerOverloaded
from daskinfer.server.core import ModelNotServed, ServerCore, ServedModel

logger = logging.getLogger(__name__)

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj).encode(), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


class RestApp:
    """aiohttp handlers over a :class:`ServerCore`."""

    def __init__(self, core: ServerCore, server_name: str = "daskinfer", server_version: str = ""):
        self.core = core
        self.server_name = server_name
        self.server_version = server_version

    def application(self, max_message_size: int) -> web.Application:
        app = web.Application(client_max_size=max_message_size)
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_post(base + "/infer", self.infer)
        return app

    def _model(self, request: web.Request) -> ServedModel:
        return self.core.get(request.match_info["name"], request.match_info.get("version", ""))

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": self.server_name, "version": self.server_version, "extensions": []})

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return _json({"ready": self.core.ready}, 200 if self.core.ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            return _json(self._model(request).metadata())
        except ModelNotServed as e:
            return _error(str(e), 404)

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self._model(request)
        except ModelNotServed as e:
            return _error(str(e), 404)
        return _json({"ready": self.core.ready}, 200 if self.core.ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        if not self.core.ready:
            return _error("the server is not ready (starting or stopping)", 503)
        try:
            model = self._model(request)
        except ModelNotServed as e:
            return _error(str(e), 404)
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            return _error(f"model {model.name!r}: the request body is not JSON: {e}", 400)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            return _error(f"model {model.name!r}: expected an object with an 'inputs' list", 400)
        try:
            block = {}
            for i, t in enumerate(body["inputs"]):
                name, arr = v2.from_json_tensor(t, f"input {i}")
                block[name] = arr
        except v2.TensorDecodeError as e:
            return _error(f"model {model.name!r}: {e}", 400)
        requested = None
        if isinstance(body.get("outputs"), list):
            requested = [o.get("name") for o in body["outputs"] if isinstance(o, dict)] or None
        try:
            out = await model.infer(block, requested)
        except RequestError as e:
            return _error(str(e), 400)
        except KeyError as e:
            return _error(str(e.args[0]), 400)
        except ServerOverloaded as e:
            return _error(str(e), 503)
        except Exception as e:
            logger.warning("model %s failed on a batch: %s: %s", model.name, type(e).__name__, e)
            return _error(f"model {model.name!r} failed: {type(e).__name__}: {e}", 500)
        resp: dict[str, Any] = {
            "model_name": model.name,
            "model_version": model.version,
            "outputs": [v2.to_json_tensor(k, v) for k, v in out.items()],
        }
        if body.get("id") is not None:
            resp["id"] = body["id"]
        return _json(resp)


async def start_rest_server(
    core: ServerCore, host: str, port: int, *, max_message_size: int, server_version: str = ""
) -> tuple[web.AppRunner, int]:
    """Start the REST server on ``host:port`` (0: a free port); return its runner and port."""
    app = RestApp(core, server_version=server_version).application(max_message_size)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            bound = int(addr[1])
            break
    return runner, bound
