"""The daskinfer model server: any daskinfer model over the KServe v2 protocol (gRPC and REST).

It is the standard server of the remote mode (:class:`daskinfer.RemoteModel` with
``kserve-grpc`` or ``kserve-rest``), and Triton/KServe/MLServer clients call it
unchanged (``tritonclient`` included: binary tensor data, model configuration,
statistics, repository index).  Concurrent calls to a model are batched together
(:mod:`daskinfer.server.batcher`).  Start it from the command line with
``daskinfer serve``.  The :class:`~daskinfer.server.gateway.Gateway` speaks the same
protocol in front of pipelines on a Dask cluster (``daskinfer gateway``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from daskinfer import settings
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.server.core import ServerCore, load_models
from daskinfer.server.frontdoor import FrontDoor
from daskinfer.server.gateway import Gateway, Route
from daskinfer.server.service import V2Service

if TYPE_CHECKING:
    from daskinfer.models.spec import Model

logger = logging.getLogger(__name__)


class ModelServer(FrontDoor):
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
    max_concurrent_calls : int, optional
        Inference calls in flight at once, all models together; more are refused
        (RESOURCE_EXHAUSTED / 503 with Retry-After). Config
        ``daskinfer.remote.server.max-concurrent-calls``.
    max_message_size : int or str, optional
        Largest message or request body. Config ``daskinfer.remote.max-message-size``.
    stream_inflight : int, optional
        Requests of one gRPC ``ModelStreamInfer`` stream answered at once (the stream is read
        no further meanwhile). Config ``daskinfer.remote.server.stream-inflight``.
    tls_cert, tls_key : str, bytes or path, optional
        PEM server certificate and key: both front ends (gRPC and REST) then require TLS.
    tls_client_ca : str, bytes or path, optional
        PEM roots that client certificates must chain to (mutual TLS, on both front ends).

    Notes
    -----
    A model's exception text is never sent to callers: they get "model 'x' failed;
    error id ..." and the server log holds the full text under that id.

    Examples
    --------
    >>> with ModelServer(OnnxModel("mlp", bundled_model_path()), grpc_port=0, http_port=0) as server:
    ...     model = RemoteModel("mlp", server.grpc_address)  # doctest: +SKIP
    >>> server = await ModelServer(models, grpc_port=0, http_port=0).astart()  # doctest: +SKIP
    """

    kind = "model server"

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
        max_concurrent_calls: int | None = None,
        max_message_size: int | str | None = None,
        stream_inflight: int | None = None,
        tls_cert: str | bytes | os.PathLike | None = None,
        tls_key: str | bytes | os.PathLike | None = None,
        tls_client_ca: str | bytes | os.PathLike | None = None,
    ):
        super().__init__(
            host=str(settings.get("remote.server.host", host)),
            grpc_port=int(settings.get("remote.server.grpc-port", grpc_port)),
            http_port=int(settings.get("remote.server.http-port", http_port)),
            serve_grpc=serve_grpc,
            serve_http=serve_http,
            max_message_size=settings.get_bytes("remote.max-message-size", max_message_size),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            stream_inflight=int(settings.get("remote.server.stream-inflight", stream_inflight)),
        )
        self.models = models
        self.policy = BatchPolicy.from_config(max_batch_size, max_delay, max_inflight)
        self.max_queue_rows = int(settings.get("remote.server.max-queue-rows", max_queue_rows))
        self.max_concurrent_calls = int(settings.get("remote.server.max-concurrent-calls", max_concurrent_calls))
        self.retry_after = settings.get_seconds("remote.server.retry-after")

    @property
    def core(self) -> ServerCore | None:
        """The served models (while running)."""
        return self.service  # type: ignore[return-value]

    async def _open_service(self) -> V2Service:
        deployments = await asyncio.to_thread(load_models, self.models)
        try:
            return ServerCore(
                deployments, self.policy, self.max_queue_rows, self.max_concurrent_calls, self.retry_after
            )
        except BaseException:
            for d in deployments:
                d.retire()
            raise

    async def _close_service(self, service: V2Service) -> None:
        assert isinstance(service, ServerCore)
        service.close()


__all__ = ["Gateway", "ModelServer", "Route"]
