"""Which pipeline a gateway's v2 model name fronts, and what that pipeline takes and gives.

:func:`describe_route` finds the pipeline that reads the route's inbox (its spec, from the
scheduler's controller), loads its stages here (they come from the deploying client over
Dask's comms, never from a broker), reads the metadata of the models they name and
describes the pipeline (:func:`daskinfer.server.signature.describe`).  When no pipeline
reads the inbox yet, the route's model (default: the v2 name) stands for it, and the
metadata says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daskinfer.control.lookup import pipeline_spec_on_scheduler
from daskinfer.dataflow.spec import PipelineSpec
from daskinfer.dataflow.stages import Infer
from daskinfer.exceptions import ConfigError, ModelNotFoundError
from daskinfer.models.deploy import ModelMetadata, model_metadata
from daskinfer.server.signature import Signature, Tensors, describe, models_named

logger = logging.getLogger(__name__)
_reported: set[str] = set()  # stage load failures already logged (the metadata is described every refresh)


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
        The deployed model that requests name (the pipeline runs it in its ``infer()``
        stages that name none). Default: none, so the pipeline's own model runs.
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


def parse_routes(pipelines: Mapping[str, str] | Iterable[Route | str]) -> list[Route]:
    """The routes of a gateway, from ``{name: "INBOX[:MODEL]"}`` or ``Route``/``"NAME=INBOX[:MODEL]"`` items."""
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


@dataclass(frozen=True)
class RouteInfo:
    """What a route's v2 metadata says: a version, a kind (a model kind, or ``"pipeline"``), the tensors."""

    version: str
    kind: str
    signature: Signature


async def _metadata(dask_client: Any, name: str) -> ModelMetadata | None:
    try:
        return await model_metadata(dask_client, name)
    except ModelNotFoundError:
        return None


async def describe_route(dask_client: Any, route: Route, where: str = "the cluster") -> RouteInfo:
    """Describe the pipeline behind ``route`` (see the module docstring).

    Raises
    ------
    ConfigError
        ``route.model`` is not deployed; or no pipeline reads the inbox and no model of the
        route's name is deployed either.
    """
    if route.model is not None and await _metadata(dask_client, route.model) is None:
        raise ConfigError(
            f"model {route.model!r} (for pipeline inbox {route.inbox!r}) is not deployed on {where}; "
            "deploy it, or leave MODEL out of NAME=INBOX:MODEL to use the pipeline's own model"
        )
    spec = await dask_client.run_on_scheduler(pipeline_spec_on_scheduler, inbox=route.inbox)
    if spec is None:
        return await _model_alone(dask_client, route, where)
    pspec = PipelineSpec.from_plain(spec)
    default = route.model or pspec.model
    try:
        stages = pspec.load_stages()
    except Exception as e:  # a stage's function from a module this process cannot import
        why = f"not known: the stages of pipeline {pspec.name!r} cannot be loaded here ({type(e).__name__}: {e})"
        if why not in _reported:
            _reported.add(why)
            logger.warning("gateway: %s", why)
        meta = await _metadata(dask_client, default) if default else None
        return RouteInfo(meta.version if meta else "1", "pipeline", Signature(Tensors(None, why), Tensors(None, why)))
    metas = {}
    for name in sorted(models_named(stages, default)):
        meta = await _metadata(dask_client, name)
        if meta is not None:
            metas[name] = meta
    signature = describe(stages, default, metas, pspec.outputs)
    single = len(stages) == 1 and isinstance(stages[0], Infer)
    main = metas.get(default or "") or (next(iter(metas.values())) if len(metas) == 1 else None)
    version = main.version if main is not None else "1"
    kind = main.kind if single and main is not None else "pipeline"
    return RouteInfo(version, kind, signature)


async def _model_alone(dask_client: Any, route: Route, where: str) -> RouteInfo:
    name = route.model or route.name
    meta = await _metadata(dask_client, name)
    if meta is None:
        raise ConfigError(
            f"model {name!r} (for pipeline inbox {route.inbox!r}) is not deployed on {where}, "
            f"and no pipeline reads inbox {route.inbox!r} there"
        )
    note = f"model {name!r} (no pipeline reads inbox {route.inbox!r} yet)"
    signature = Signature(
        Tensors(None if meta.inputs is None else tuple(meta.inputs), f"the inputs of {note}"),
        Tensors(None if meta.outputs is None else tuple(meta.outputs), f"the outputs of {note}"),
    )
    return RouteInfo(meta.version, meta.kind, signature)
