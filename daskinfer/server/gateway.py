"""The gateway: KServe v2 over REST and gRPC in front of pipelines on a Dask cluster.

Callers that speak HTTP or gRPC (``tritonclient``, KServe and MLServer clients,
``curl``) use a deployed pipeline (its batching, partitions and scaling) without the
Python client.  Each v2 model name maps to one pipeline's inbox; a v2 request becomes one
pipeline request with all its rows kept together
(:meth:`~daskinfer.InferenceClient.submit_many`), and its result becomes the v2
response.

- A request that gets no answer within its timeout (config ``daskinfer.gateway.timeout``,
  or less when the caller's gRPC deadline or Triton ``timeout`` parameter says so) is
  answered 504 / DEADLINE_EXCEEDED.
- A full inbox, or more calls in flight than ``max-concurrent-calls``, is answered
  503 / RESOURCE_EXHAUSTED with ``Retry-After``.
- The gateway keeps no state beyond the calls in flight (each process has its own reply
  topic), so several gateway processes can front the same pipelines.
- The v2 metadata of a name describes its **pipeline**: the inputs its first stages read
  and the outputs of its last stage, with dtypes and shapes, where the stages tell
  (:mod:`daskinfer.server.signature`).  Where they do not (a ``map_batches`` stage), it
  says so in the REST metadata's ``parameters`` and, once requests were answered, gives
  the tensors they showed, marked as seen.  A request is checked against the inputs where
  they are known; a one-input pipeline takes its input under any name, as the Python client.
- A failed request is 400 / INVALID_ARGUMENT with the reason when the caller's request
  caused it (a filter turned it away, its input does not fit), 500 / INTERNAL with an error
  id for faults of the pipeline or model (the rule: :mod:`daskinfer.server.errors`).

Start it with ``daskinfer gateway --scheduler ADDRESS --pipeline NAME=INBOX``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.client import InferenceClient
from daskinfer.exceptions import ConfigError, TopicFullError
from daskinfer.models.contract import validate_block
from daskinfer.server.errors import Overloaded, Unavailable, from_result_error
from daskinfer.server.frontdoor import FrontDoor
from daskinfer.server.routes import Route, RouteInfo, describe_route, parse_routes
from daskinfer.server.service import CallStats, V2Model, V2Service, model_config, v2_metadata
from daskinfer.server.signature import Tensors, seen

logger = logging.getLogger(__name__)

_ANSWER_GRACE = 1.0
"""Seconds past a request's deadline that the gateway waits for the pipeline's own deadline answer."""


def _scheduler_address(scheduler: Any) -> str:
    if isinstance(scheduler, str):
        return scheduler
    for attr in ("scheduler_address",):  # LocalCluster and other cluster managers
        if isinstance(getattr(scheduler, attr, None), str):
            return getattr(scheduler, attr)
    address = getattr(getattr(scheduler, "scheduler", None), "address", None)  # distributed.Client
    if isinstance(address, str):
        return address
    raise ConfigError(f"the gateway needs a scheduler address, a Client or a cluster, got {type(scheduler).__name__}")


async def reach_scheduler(address: str, timeout: float) -> None:
    """Fail at once, naming ``address``, when nothing listens there (Dask's own connect would retry a
    refused connection for ``distributed.comm.timeouts.connect``, 30 s); TCP and TLS addresses only."""
    from distributed.comm import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the Dask scheduler at {address}: {e.strerror or e} (is a scheduler running there?)"
        ) from None
    writer.close()


class PipelineModel(V2Model):
    """A v2 model whose requests go to a pipeline through an asynchronous InferenceClient."""

    def __init__(
        self,
        route: Route,
        client: InferenceClient,
        info: RouteInfo,
        timeout: float,
        max_batch_size: int,
        retry_after: float,
    ):
        self.route = route
        self.client = client
        self.name = route.name
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self.retry_after = retry_after
        self.stats = CallStats()
        self.seen_inputs: Tensors | None = None  # what answered requests showed, where the stages do not tell
        self.seen_outputs: Tensors | None = None
        self.info = info

    @property
    def info(self) -> RouteInfo:
        return self._info

    @info.setter
    def info(self, info: RouteInfo) -> None:
        if getattr(self, "_info", None) != info:  # a new deployment: what was seen may no longer hold
            self.seen_inputs = self.seen_outputs = None
        self._info = info

    @property
    def version(self) -> str:  # type: ignore[override]
        return self.info.version

    def tensors(self) -> tuple[Tensors, Tensors]:
        """The inputs and outputs to report: the pipeline's where known, else those seen, else unknown."""
        sig = self.info.signature
        inputs = sig.inputs if sig.inputs.known else (self.seen_inputs or sig.inputs)
        outputs = sig.outputs if sig.outputs.known else (self.seen_outputs or sig.outputs)
        return inputs, outputs

    def metadata(self) -> dict[str, Any]:
        inputs, outputs = self.tensors()
        meta = v2_metadata(self.name, self.version, self.info.kind, list(inputs.specs or ()), list(outputs.specs or ()))
        meta["parameters"] = {"inputs": inputs.source, "outputs": outputs.source}
        return meta

    def config(self) -> dict[str, Any]:
        inputs, outputs = self.tensors()
        return model_config(
            self.name, self.info.kind, list(inputs.specs or ()), list(outputs.specs or ()), self.max_batch_size
        )

    def _checked(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs as the pipeline takes them; a bad request never reaches the pipeline."""
        specs = self.info.signature.inputs.specs
        if specs is None:
            return inputs  # the pipeline's stages check them
        if len(specs) == 1 and len(inputs) == 1:  # one input: under any name, as the Python client
            inputs = {specs[0].name: next(iter(inputs.values()))}
        validate_block(inputs, list(specs), self.name)
        return inputs

    async def run(self, inputs: dict[str, np.ndarray], timeout: float | None) -> dict[str, np.ndarray]:
        inputs = self._checked(inputs)
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            future = self.client.submit_many(inputs, deadline=timeout)
            result = await asyncio.wait_for(future, timeout + min(_ANSWER_GRACE, timeout))
        except TopicFullError:
            raise Overloaded(
                f"model {self.name!r}: the pipeline is full (its inbox, or the gateway's max-pending "
                "unanswered requests); try again later",
                retry_after=self.retry_after,
            ) from None
        except (ConnectionError, RuntimeError) as e:  # the client is closed or lost its cluster
            raise Unavailable(f"model {self.name!r}: the gateway cannot reach the pipeline ({e})") from None
        if not result.ok:
            raise from_result_error(result.error_type or "", result.error or "", self.name, self.retry_after)
        timings = result.timings
        if "queue" in timings and "infer" in timings:
            self.stats.timed_count += 1
            self.stats.queue_ns += int(timings["queue"] * 1e9)
            self.stats.infer_ns += int(timings["infer"] * 1e9)
        outputs = dict(result.outputs or {})
        sig = self.info.signature
        if not sig.inputs.known and self.seen_inputs is None:
            self.seen_inputs = seen(inputs, sig.inputs.source)
        if not sig.outputs.known and self.seen_outputs is None:
            self.seen_outputs = seen(outputs, sig.outputs.source)
        return outputs


class GatewayService(V2Service):
    """The gateway's models: one :class:`PipelineModel` per route, and their metadata refresh."""

    def __init__(
        self,
        models: dict[str, PipelineModel],
        dask_client: Any,
        refresh: float,
        max_concurrent_calls: int,
        retry_after: float,
    ):
        super().__init__(max_concurrent_calls, retry_after)
        self._models = models
        self.dask_client = dask_client
        self.refresh = refresh
        self._refresher: asyncio.Task | None = None
        if refresh > 0:
            self._refresher = asyncio.ensure_future(self._refresh_metadata())

    def models(self) -> dict[str, PipelineModel]:
        return self._models

    async def _refresh_metadata(self) -> None:
        """Follow version swaps and redeployments: describe each route again every ``refresh`` seconds."""
        while True:
            await asyncio.sleep(self.refresh)
            for m in self._models.values():
                try:
                    m.info = await describe_route(self.dask_client, m.route)
                except Exception as e:  # the model is being redeployed, a worker is gone...
                    logger.warning("gateway: cannot refresh the metadata of %r: %s", m.name, e)

    async def aclose(self) -> None:
        self.ready = False
        if self._refresher is not None:
            self._refresher.cancel()
        for m in self._models.values():
            try:
                await m.client.aclose()
            except Exception:  # pragma: no cover - the cluster is gone already
                logger.debug("closing the gateway's client of %r failed", m.route.inbox, exc_info=True)
        await self.dask_client.close()


class Gateway(FrontDoor):
    """KServe v2 over REST and gRPC in front of pipelines deployed on a Dask cluster.

    Parameters
    ----------
    scheduler : str, distributed.Client or cluster
        Where the pipelines run (the gateway opens its own connection to this scheduler).
    pipelines : dict of name -> "INBOX[:MODEL]", or list of Route or "NAME=INBOX[:MODEL]"
        The v2 model names and the pipelines behind them (see :class:`Route`).
    host : str, optional
        Interface to bind; config ``daskinfer.gateway.host`` (127.0.0.1: this machine only).
    grpc_port, http_port : int, optional
        Ports; 0 picks a free one. Config ``daskinfer.gateway.grpc-port`` / ``http-port``.
    serve_grpc, serve_http : bool
        Which front ends to run.
    timeout : float or str, optional
        Longest a request waits for its answer before 504 / DEADLINE_EXCEEDED; config
        ``daskinfer.gateway.timeout``. A caller's own shorter deadline wins.
    max_concurrent_calls : int, optional
        Calls in flight at once; more get 503 / RESOURCE_EXHAUSTED. Config
        ``daskinfer.gateway.max-concurrent-calls``.
    max_pending : int, optional
        Requests each pipeline's client holds unanswered before it refuses more (503).
        Config ``daskinfer.gateway.max-pending``.
    max_message_size : int or str, optional
        Largest request body or message. Config ``daskinfer.gateway.max-message-size``.
    stream_inflight : int, optional
        Requests of one gRPC ``ModelStreamInfer`` stream answered at once (the stream is read
        no further meanwhile). Config ``daskinfer.gateway.stream-inflight``.
    tls_cert, tls_key, tls_client_ca : str, bytes or path, optional
        PEM certificate and key (TLS on both front ends), and client roots (mutual TLS).

    Examples
    --------
    >>> with Gateway(client, {"mlp": "requests"}, http_port=0, grpc_port=0) as gw:  # doctest: +SKIP
    ...     print(gw.http_url)   # POST {gw.http_url}/v2/models/mlp/infer
    """

    kind = "gateway"
    server_name = "daskinfer-gateway"

    def __init__(
        self,
        scheduler: Any,
        pipelines: Mapping[str, str] | Iterable[Route | str],
        *,
        host: str | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        serve_grpc: bool = True,
        serve_http: bool = True,
        timeout: float | str | None = None,
        max_concurrent_calls: int | None = None,
        max_pending: int | None = None,
        max_message_size: int | str | None = None,
        stream_inflight: int | None = None,
        tls_cert: str | bytes | os.PathLike | None = None,
        tls_key: str | bytes | os.PathLike | None = None,
        tls_client_ca: str | bytes | os.PathLike | None = None,
    ):
        super().__init__(
            host=str(settings.get("gateway.host", host)),
            grpc_port=int(settings.get("gateway.grpc-port", grpc_port)),
            http_port=int(settings.get("gateway.http-port", http_port)),
            serve_grpc=serve_grpc,
            serve_http=serve_http,
            max_message_size=settings.get_bytes("gateway.max-message-size", max_message_size),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            stream_inflight=int(settings.get("gateway.stream-inflight", stream_inflight)),
        )
        self.scheduler_address = _scheduler_address(scheduler)
        self.routes = parse_routes(pipelines)
        self.timeout = settings.get_seconds("gateway.timeout", timeout)
        self.connect_timeout = settings.get_seconds("gateway.connect-timeout")
        if self.timeout <= 0:
            raise ConfigError(f"the gateway's timeout must be positive, got {timeout!r}")
        self.max_concurrent_calls = int(settings.get("gateway.max-concurrent-calls", max_concurrent_calls))
        self.max_pending = int(settings.get("gateway.max-pending", max_pending))
        self.retry_after = settings.get_seconds("gateway.retry-after")
        self.metadata_refresh = settings.get_seconds("gateway.metadata-refresh")
        self.max_batch_size = int(settings.get("batching.max-batch-size"))

    async def _open_service(self) -> V2Service:
        from distributed import Client

        await reach_scheduler(self.scheduler_address, self.connect_timeout)
        dask_client = await Client(self.scheduler_address, asynchronous=True, timeout=self.connect_timeout)
        models: dict[str, PipelineModel] = {}
        try:
            for route in self.routes:
                info = await describe_route(dask_client, route, where=self.scheduler_address)
                ic = InferenceClient(dask_client, inbox=route.inbox, model=route.model, max_pending=self.max_pending)
                await ic
                models[route.name] = PipelineModel(route, ic, info, self.timeout, self.max_batch_size, self.retry_after)
        except BaseException:
            for m in models.values():
                await m.client.aclose()
            await dask_client.close()
            raise
        return GatewayService(models, dask_client, self.metadata_refresh, self.max_concurrent_calls, self.retry_after)

    async def _close_service(self, service: V2Service) -> None:
        assert isinstance(service, GatewayService)
        await service.aclose()


__all__ = ["Gateway", "Route"]
