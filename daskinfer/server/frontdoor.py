"""The part of a v2 server that faces the network: ports, TLS, start and stop.

:class:`FrontDoor` runs the gRPC and REST front ends over a
:class:`~daskinfer.server.service.V2Service` that a subclass opens and closes
(:class:`~daskinfer.server.ModelServer`: models in this process;
:class:`~daskinfer.server.gateway.Gateway`: pipelines on a Dask cluster).  It offers the
async API (``astart``/``astop``, ``async with``), the sync API on a private event loop
thread (``start``/``stop``, ``with``) and :meth:`FrontDoor.serve_forever` for the CLI.

With a certificate and key both front ends speak TLS only; with client roots both
require client certificates (mutual TLS), so no port is left in plaintext.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
import ssl
import tempfile
import threading
from typing import Any

from daskinfer import eventloop
from daskinfer.exceptions import ConfigError
from daskinfer.remote.base import LoopThread
from daskinfer.server.service import V2Service

logger = logging.getLogger(__name__)

Pem = str | bytes | os.PathLike


def read_pem(value: Pem | None) -> bytes | None:
    """PEM bytes given as bytes or as a path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(os.fspath(value), "rb") as f:
        return f.read()


def server_ssl_context(cert: bytes, key: bytes, client_ca: bytes | None) -> ssl.SSLContext:
    """A TLS server context from PEM bytes; with ``client_ca`` it requires client certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # the ssl module loads a certificate chain from files only: a private temporary directory
    with tempfile.TemporaryDirectory(prefix="daskinfer-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as e:
            raise ConfigError(f"the TLS certificate and key do not load: {e}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as e:
            raise ConfigError(f"the TLS client roots (tls_client_ca) do not load: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class FrontDoor(abc.ABC):
    """gRPC and REST front ends over a service that subclasses open (see module docs).

    Subclasses set :attr:`kind` (for log lines) and implement :meth:`_open_service`
    and :meth:`_close_service`.
    """

    kind = "v2 server"
    server_name = "daskinfer"
    share_ports = False
    """Bind with ``SO_REUSEPORT``, so that several processes serve the same ports (the kernel spreads
    the connections over them): ``daskinfer gateway --workers N`` sets it in each of its processes.
    Off by default: a port in use is then an error naming it, not silently shared."""

    def __init__(
        self,
        *,
        host: str,
        grpc_port: int,
        http_port: int,
        serve_grpc: bool,
        serve_http: bool,
        max_message_size: int,
        tls_cert: Pem | None,
        tls_key: Pem | None,
        tls_client_ca: Pem | None,
        stream_inflight: int,
    ):
        if not (serve_grpc or serve_http):
            raise ConfigError(f"the {self.kind} needs at least one of serve_grpc and serve_http")
        self.host = host
        self._grpc_port_arg = grpc_port
        self._http_port_arg = http_port
        self.serve_grpc = serve_grpc
        self.serve_http = serve_http
        self.max_message_size = max_message_size
        if stream_inflight < 1:
            raise ConfigError(
                f"the {self.kind}'s stream-inflight (requests of one gRPC stream answered at once) "
                f"must be at least 1, got {stream_inflight}"
            )
        self.stream_inflight = stream_inflight
        self.tls_cert = read_pem(tls_cert)
        self.tls_key = read_pem(tls_key)
        self.tls_client_ca = read_pem(tls_client_ca)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both tls_cert and tls_key (or neither)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.service: V2Service | None = None
        self._grpc_server: Any = None
        self._rest_runner: Any = None
        self._thread: LoopThread | None = None

    # -- what subclasses provide ----------------------------------------------------------
    @abc.abstractmethod
    async def _open_service(self) -> V2Service:
        """Open the service the front ends serve (load models, connect to a cluster)."""

    @abc.abstractmethod
    async def _close_service(self, service: V2Service) -> None:
        """Release what :meth:`_open_service` opened."""

    # -- addresses ----------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def grpc_address(self) -> str:
        """``grpc[s]://host:port`` of the gRPC front end (the ``url`` of a ``kserve-grpc`` RemoteModel)."""
        return f"{'grpcs' if self.tls_cert else 'grpc'}://{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http[s]://host:port`` of the REST front end."""
        return f"{'https' if self.tls_cert else 'http'}://{self._client_host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.service is not None and self.service.ready

    # -- async API ---------------------------------------------------------------------
    async def astart(self) -> FrontDoor:
        """Open the service and start serving (in the running event loop)."""
        if self.service is not None:
            return self
        from daskinfer.version import __version__

        service = await self._open_service()
        try:
            if self.serve_grpc:
                from daskinfer.server.grpc_server import start_grpc_server

                self._grpc_server, self.grpc_port = await start_grpc_server(
                    service,
                    self.host,
                    self._grpc_port_arg,
                    max_message_size=self.max_message_size,
                    tls_cert=self.tls_cert,
                    tls_key=self.tls_key,
                    tls_client_ca=self.tls_client_ca,
                    server_name=self.server_name,
                    server_version=__version__,
                    share_port=self.share_ports,
                    stream_inflight=self.stream_inflight,
                )
            if self.serve_http:
                from daskinfer.server.rest_server import start_rest_server

                ssl_context = None
                if self.tls_cert is not None and self.tls_key is not None:
                    ssl_context = server_ssl_context(self.tls_cert, self.tls_key, self.tls_client_ca)
                self._rest_runner, self.http_port = await start_rest_server(
                    service,
                    self.host,
                    self._http_port_arg,
                    max_message_size=self.max_message_size,
                    ssl_context=ssl_context,
                    server_name=self.server_name,
                    server_version=__version__,
                    share_port=self.share_ports,
                )
        except BaseException:
            await self._stop_front_ends(0)
            await self._close_service(service)
            raise
        service.ready = True
        self.service = service
        logger.info(
            "daskinfer %s: models %s; gRPC %s, REST %s%s; event loop %s",
            self.kind,
            sorted(service.models()),
            self.grpc_address if self.serve_grpc else "off",
            self.http_url if self.serve_http else "off",
            "; mutual TLS" if self.tls_client_ca else "",
            eventloop.loop_name(),
        )
        return self

    async def _stop_front_ends(self, grace: float | None) -> None:
        server, self._grpc_server = self._grpc_server, None
        runner, self._rest_runner = self._rest_runner, None
        if server is not None:
            await server.stop(grace)
        if runner is not None:
            await runner.cleanup()

    async def astop(self, grace: float | None = 0) -> None:
        """Stop serving: refuse new calls, give running ones ``grace`` seconds, close the service."""
        service, self.service = self.service, None
        if service is not None:
            service.ready = False
        await self._stop_front_ends(grace)
        if service is not None:
            await self._close_service(service)

    async def __aenter__(self) -> Any:
        return await self.astart()

    async def __aexit__(self, *exc: Any) -> None:
        await self.astop()

    # -- sync API (a private event loop on a thread) --------------------------------------
    def start(self) -> Any:
        """Start serving from a private event loop thread; returns once the ports are bound."""
        if self._thread is None:
            self._thread = LoopThread(f"daskinfer-{self.kind.replace(' ', '-')}")
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

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM (the ``daskinfer serve`` / ``daskinfer gateway`` commands)."""

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
        eventloop.run(main())  # the loop distributed.admin.event-loop names (uvloop, or the standard one)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {state} gRPC {self.grpc_port} REST {self.http_port}>"
