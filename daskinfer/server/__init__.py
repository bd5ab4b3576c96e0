"""The daskinfer model server: any daskinfer model over the KServe v2 protocol (gRPC and REST).

It is the standard server of the remote mode (:class:`daskinfer.RemoteModel` with
``kserve-grpc`` or ``kserve-rest``), and Triton/KServe/MLServer clients call it
unchanged.  Concurrent calls to a model are batched together
(:mod:`daskinfer.server.batcher`).  The REST front end needs aiohttp
(``pip install daskinfer[http]``); start it from the command line with
``daskinfer serve``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from daskinfer import settings
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.exceptions import ConfigError
from daskinfer.remote.base import LoopThread
from daskinfer.server.core import ServerCore, load_models

if TYPE_CHECKING:
    from daskinfer.models.spec import Model

logger = logging.getLogger(__name__)


def _read_pem(value: str | bytes | os.PathLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(os.fspath(value), "rb") as f:
        return f.read()


class ModelServer:
    """Serve daskinfer models over the KServe v2 / Open Inference Protocol.

    Parameters
    ----------
    models : Model, list of Model or dict of name -> Model
        What to serve (:class:`~daskinfer.OnnxModel`, :class:`~daskinfer.PythonModel`, or even
        a :class:`~daskinfer.RemoteModel` to front another service); loaded when the server starts.
    host : str, optional
        Interface to bind; config ``daskinfer.remote.server.host`` (127.0.0.1: this machine only).
    grpc_port, http_port : int, optional
        Ports; 0 picks a free one (read it back from :attr:`grpc_port`/:attr:`http_port`).
        Config ``daskinfer.remote.server.grpc-port``/``http-port``.
    serve_grpc, serve_http : bool
        Which front ends to run.
    max_batch_size, max_delay, max_inflight : optional
        Batching across callers; config ``daskinfer.batching.*``.
    max_queue_rows : int, optional
        Rows allowed to wait per model before calls are refused (RESOURCE_EXHAUSTED / 503).
        Config ``daskinfer.remote.server.max-queue-rows``.
    max_message_size : int or str, optional
        Largest message or request body. Config ``daskinfer.remote.max-message-size``.
    tls_cert, tls_key : str, bytes or path, optional
        PEM server certificate and key: the gRPC front end then requires TLS.
    tls_client_ca : str, bytes or path, optional
        PEM roots that client certificates must chain to (mutual TLS).

    Examples
    --------
    >>> with ModelServer(OnnxModel("mlp", bundled_model_path()), grpc_port=0, http_port=0) as server:
    ...     model = RemoteModel("mlp", server.grpc_address)  # doctest: +SKIP
    >>> server = await ModelServer(models, grpc_port=0, http_port=0).astart()  # doctest: +SKIP
    """

    def __init__(
        self,
        models: Model | list[Model] | dict[str, Model],
        *,
        host: str | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        serve_grpc: bool = True,
        serve_http: bool = True,
        max_batch_size: int | None = None,
        max_delay: float | str | None = None,
        max_inflight: int | None = None,
        max_queue_rows: int | None = None,
        max_message_size: int | str | None = None,
        tls_cert: str | bytes | os.PathLike | None = None,
        tls_key: str | bytes | os.PathLike | None = None,
        tls_client_ca: str | bytes | os.PathLike | None = None,
    ):
        if not (serve_grpc or serve_http):
            raise ConfigError("the model server needs at least one of serve_grpc and serve_http")
        self.models = models
        self.host = str(settings.get("remote.server.host", host))
        self._grpc_port_arg = int(settings.get("remote.server.grpc-port", grpc_port))
        self._http_port_arg = int(settings.get("remote.server.http-port", http_port))
        self.serve_grpc = serve_grpc
        self.serve_http = serve_http
        self.policy = BatchPolicy.from_config(max_batch_size, max_delay, max_inflight)
        self.max_queue_rows = int(settings.get("remote.server.max-queue-rows", max_queue_rows))
        self.max_message_size = settings.get_bytes("remote.max-message-size", max_message_size)
        self.tls_cert = _read_pem(tls_cert)
        self.tls_key = _read_pem(tls_key)
        self.tls_client_ca = _read_pem(tls_client_ca)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both tls_cert and tls_key (or neither)")
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.core: ServerCore | None = None
        self._grpc_server: Any = None
        self._runner: Any = None
        self._thread: LoopThread | None = None
        self._deployments: list[Any] | None = None

    # -- addresses ----------------------------------------------------------------------
    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC front end (the ``url`` of a ``kserve-grpc`` RemoteModel)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'grpcs' if self.tls_cert else 'grpc'}://{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the REST front end."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.core is not None and self.core.ready

    # -- async API ---------------------------------------------------------------------
    async def astart(self) -> ModelServer:
        """Load the models and start serving (in the running event loop)."""
        if self.core is not None:
            return self
        from daskinfer import __version__

        if self._deployments is None:
            self._deployments = await asyncio.to_thread(load_models, self.models)
        core = ServerCore(self._deployments, self.policy, self.max_queue_rows)
        try:
            if self.serve_grpc:
                from daskinfer.server.grpc_server import start_grpc_server

                self._grpc_server, self.grpc_port = await start_grpc_server(
                    core,
                    self.host,
                    self._grpc_port_arg,
                    max_message_size=self.max_message_size,
                    tls_cert=self.tls_cert,
                    tls_key=self.tls_key,
                    tls_client_ca=self.tls_client_ca,
                    server_version=__version__,
                )
            if self.serve_http:
                from daskinfer.server.rest_server import start_rest_server

                self._runner, self.http_port = await start_rest_server(
                    core, self.host, self._http_port_arg, max_message_size=self.max_message_size, server_version=__version__
                )
        except BaseException:
            await self._stop_front_ends(0)
            core.close()
            self._deployments = None
            raise
        core.ready = True
        self.core = core
        logger.info(
            "daskinfer model server: models %s; gRPC %s, REST %s",
            sorted(core.models),
            self.grpc_address if self.serve_grpc else "off",
            self.http_url if self.serve_http else "off",
        )
        return self

    async def _stop_front_ends(self, grace: float | None) -> None:
        server, self._grpc_server = self._grpc_server, None
        runner, self._runner = self._runner, None
        if server is not None:
            await server.stop(grace)
        if runner is not None:
            await runner.cleanup()

    async def astop(self, grace: float | None = 0) -> None:
        """Stop serving: refuse new calls, give running ones ``grace`` seconds, release the models."""
        core, self.core = self.core, None
        if core is not None:
            core.ready = False
        await self._stop_front_ends(grace)
        if core is not None:
            core.close()
        self._deployments = None

    async def __aenter__(self) -> ModelServer:
        return await self.astart()

    async def __aexit__(self, *exc: Any) -> None:
        await self.astop()

    # -- sync API (a private event loop on a thread) --------------------------------------
    def start(self) -> ModelServer:
        """Start serving from a private event loop thread; returns once the ports are bound."""
        if self._thread is None:
            self._thread = LoopThread("daskinfer-model-server")
        try:
            self._thread.run(self.astart(), None)
        except BaseException:
            self._thread.stop()
            self._thread = None
            raise
        return self

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving and end the private event loop thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            thread.run(self.astop(grace), 30)
        finally:
            thread.stop()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM (the ``daskinfer serve`` command)."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread / Windows
                    pass
            await self.astart()
            try:
                await stop.wait()
            finally:
                await self.astop(grace=1)

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve_forever() runs in the main thread; use start()/stop() elsewhere")
        asyncio.run(main())

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ModelServer {state} gRPC {self.grpc_port} REST {self.http_port}>"


__all__ = ["ModelServer"]
