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

Start it with ``daskinfer gateway --scheduler ADDRESS --pipeline NAME=INBOX``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.client import InferenceClient
from daskinfer.exceptions import ConfigError, ModelNotFoundError, TopicFullError
from daskinfer.models.contract import validate_block
from daskinfer.models.deploy import ModelMetadata, model_metadata
from daskinfer.server.errors import Overloaded, Unavailable, from_result_error
from daskinfer.server.frontdoor import FrontDoor
from daskinfer.server.service import CallStats, V2Model, V2Service, model_config, v2_metadata

logger = logging.getLogger(__name__)

_ANSWER_GRACE = 1.0
"""Seconds past a request's deadline that the gateway waits for the pipeline's own deadline answer."""


@dataclass(frozen=True)
class Route:
    """One v2 model name in front of one pipeline.

    Parameters
    ----------
    name : str
        The model name callers use (``/v2/models/{name}/infer``).
    inbox : str
        The pipeline's inbox topic.
    model : str, optional
        The deployed model that the pipeline runs for these requests; its inputs and
        outputs are the v2 metadata. Default: ``name`` (and requests name no model, so
        the pipeline's default model runs).
    """

    name: str
    inbox: str
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> Route:
        """``NAME=INBOX`` or ``NAME=INBOX:MODEL`` (the CLI's ``--pipeline``)."""
        name, sep, rest = text.partition("=")
        inbox, _, model = rest.partition(":")
        if not sep or not name or not inbox:
            raise ConfigError(f"expected NAME=INBOX or NAME=INBOX:MODEL, got {text!r}")
        return cls(name, inbox, model or None)


def _routes(pipelines: Mapping[str, str] | Iterable[Route | str]) -> list[Route]:
    if isinstance(pipelines, Mapping):
        routes = [Route.parse(f"{name}={inbox}") for name, inbox in pipelines.items()]
    else:
        routes = [p if isinstance(p, Route) else Route.parse(str(p)) for p in pipelines]
    if not routes:
        raise ConfigError("the gateway needs at least one pipeline (a v2 model name and its inbox)")
    names = [r.name for r in routes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"the gateway is given model name(s) {dupes} twice; each name fronts one pipeline")
    return routes


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


class PipelineModel(V2Model):
    """A v2 model whose requests go to a pipeline through an asynchronous InferenceClient."""

    def __init__(
        self,
        route: Route,
        client: InferenceClient,
        meta: ModelMetadata,
        timeout: float,
        max_batch_size: int,
        retry_after: float,
    ):
        self.route = route
        self.client = client
        self.meta = meta
        self.name = route.name
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self.retry_after = retry_after
        self.stats = CallStats()

    @property
    def version(self) -> str:  # type: ignore[override]
        return self.meta.version

    def metadata(self) -> dict[str, Any]:
        meta = self.meta
        return v2_metadata(self.name, meta.version, meta.kind, meta.inputs or [], meta.outputs or [])

    def config(self) -> dict[str, Any]:
        meta = self.meta
        return model_config(self.name, meta.kind, meta.inputs or [], meta.outputs or [], self.max_batch_size)

    async def run(self, inputs: dict[str, np.ndarray], timeout: float | None) -> dict[str, np.ndarray]:
        validate_block(inputs, self.meta.inputs, self.name)  # a bad request never reaches the pipeline
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
        return dict(result.outputs or {})


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
        """Follow version swaps: re-read each model's metadata every ``refresh`` seconds."""
        while True:
            await asyncio.sleep(self.refresh)
            for m in self._models.values():
                try:
                    m.meta = await model_metadata(self.dask_client, m.route.model or m.name)
                except Exception as e:  # the model is being redeployed, a worker is gone...
                    logger.warning("gateway: cannot refresh the metadata of model %r: %s", m.name, e)

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
        )
        self.scheduler_address = _scheduler_address(scheduler)
        self.routes = _routes(pipelines)
        self.timeout = settings.get_seconds("gateway.timeout", timeout)
        if self.timeout <= 0:
            raise ConfigError(f"the gateway's timeout must be positive, got {timeout!r}")
        self.max_concurrent_calls = int(settings.get("gateway.max-concurrent-calls", max_concurrent_calls))
        self.max_pending = int(settings.get("gateway.max-pending", max_pending))
        self.retry_after = settings.get_seconds("gateway.retry-after")
        self.metadata_refresh = settings.get_seconds("gateway.metadata-refresh")
        self.max_batch_size = int(settings.get("batching.max-batch-size"))

    async def _open_service(self) -> V2Service:
        from distributed import Client

        dask_client = await Client(self.scheduler_address, asynchronous=True)
        models: dict[str, PipelineModel] = {}
        try:
            for route in self.routes:
                try:
                    meta = await model_metadata(dask_client, route.model or route.name)
                except ModelNotFoundError as e:
                    raise ConfigError(
                        f"model {route.model or route.name!r} (for pipeline inbox {route.inbox!r}) "
                        f"is not deployed on {self.scheduler_address}: {e}"
                    ) from None
                ic = InferenceClient(dask_client, inbox=route.inbox, model=route.model, max_pending=self.max_pending)
                await ic
                models[route.name] = PipelineModel(route, ic, meta, self.timeout, self.max_batch_size, self.retry_after)
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
