"""Pipelines: what users compose.

>>> pipe = (Pipeline(inbox="requests")                              # doctest: +SKIP
...         .map_batches(lambda c: {"x": (c["x"] - mean) / std})
...         .infer("mlp")
...         .map_batches(lambda c: {"label": c["probabilities"].argmax(1)}))
>>> handle = deploy_pipeline(client, pipe)                          # doctest: +SKIP
>>> pipe.run({"x": rows})                                           # doctest: +SKIP

``Pipeline(model="mlp")`` is the one-line form of the simplest pipeline (one model; a
request may name another model, see ``models``).  The same pipeline object runs
in-process (:meth:`Pipeline.run`, or on a streamz ``Stream`` with ``run_pipeline``) and
deploys as partitions with :func:`~daskinfer.control.deploy.deploy_pipeline`: each inbox
partition is served by a runner on a worker (:mod:`daskinfer.dataflow.partition`); the scheduler
only assigns partitions and moves them when workers join or leave.  :meth:`Pipeline.resolve`
makes the :class:`~daskinfer.dataflow.spec.PipelineSpec` it is deployed from.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer import settings
from daskinfer.connectors.registry import connector_reference, load_connector
from daskinfer.dataflow.spec import PipelineSettings, PipelineSpec
from daskinfer.dataflow.stages import (
    Ensemble,
    Filter,
    Infer,
    MapBatches,
    Route,
    Shadow,
    Stage,
    ToTopic,
    walk,
)
from daskinfer.exceptions import ConfigError
from daskinfer.models.device import merge_resources

if TYPE_CHECKING:
    from daskinfer.models.registry import ModelRegistry


def _stage_from_entry(entry: Any, where: str) -> Stage:
    """A stage from a deployment file entry: ``{"map_batches": "module:function"}``, ``{"infer": "mlp"}``..."""
    if isinstance(entry, Stage):
        return entry
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise ConfigError(f"{where}: a stage is a mapping with one key (its kind), got {entry!r}")
    kind, arg = next(iter(entry.items()))
    kinds: dict[str, tuple[type[Stage], str]] = {
        "map_batches": (MapBatches, "fn"),
        "filter": (Filter, "fn"),
        "infer": (Infer, "model"),
        "ensemble": (Ensemble, "models"),
        "route": (Route, "branches"),
        "shadow": (Shadow, "branch"),
        "to_topic": (ToTopic, "topic"),
    }
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown stage kind {kind!r}; expected one of {sorted(kinds)}")
    cls, first = kinds[kind]
    kwargs = dict(arg) if isinstance(arg, Mapping) and first not in ("branches",) else {first: arg}
    if kind == "route" and isinstance(arg, Mapping) and "branches" in arg:
        kwargs = dict(arg)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: stage {kind!r}: {e}") from e


@dataclass
class Pipeline:
    """An inference pipeline: stages on columnar batches, between an inbox and an outbox.

    Parameters
    ----------
    model : str, optional
        The model of ``infer()`` stages that name none; alone, it makes the one-line pipeline
        ``infer(model)``, where a request may name another model (see ``models``).
    inbox, outbox : str
        Where requests come from, and where results of requests without a reply target go.
    name : str, optional
        Pipeline name (default: the inbox's name); also the inbox consumer group.
    partitions : int, optional
        Inbox partitions, one runner each; config ``daskinfer.pipeline.partitions``.
    max_batch_size, max_delay, max_inflight : optional
        Smart batching per partition; config ``daskinfer.batching.*``.
    outputs : list of str, optional
        Columns to return (default: what the last stage produced).
    dead_letter : str, optional
        Topic that keeps failed requests' bytes; config ``daskinfer.pipeline.dead-letter``.
    read_batch : int, optional
        Most messages one read takes from the inbox; config ``daskinfer.broker.get-batch``.
    max_request_size : int or str, optional
        Largest request accepted (e.g. ``"1MiB"``); config ``daskinfer.codec.max-message-size``.
    connector : str
        Where the inbox and outbox live: ``"embedded"`` (the default: topics on the Dask
        scheduler, clients straight to the workers), ``"redis"``, ``"kafka"``, or any connector
        installed in the ``daskinfer.connectors`` entry-point group (see
        :mod:`daskinfer.connectors.registry`).
    connector_options : dict
        Connector settings (e.g. ``{"url": "redis://127.0.0.1:6379/0"}``).
    models : list of str, optional
        Models a request may name (an allow-list; default: any model deployed).
    stages : list
        The stages; build them with the methods below rather than by hand.

    Examples
    --------
    >>> pipe = Pipeline(inbox="requests").map_batches(scale).infer("mlp")  # doctest: +SKIP
    """

    model: str | None = None
    inbox: str = "requests"
    outbox: str = "results"
    name: str | None = None
    partitions: int | None = None
    max_batch_size: int | None = None
    max_delay: float | str | None = None
    max_inflight: int | None = None
    outputs: list[str] | None = None
    dead_letter: str | None = None
    read_batch: int | None = None
    max_request_size: int | str | None = None
    connector: str = "embedded"
    connector_options: dict[str, Any] = field(default_factory=dict)
    models: list[str] | None = None
    stages: list[Any] = field(default_factory=list)

    # -- composing -------------------------------------------------------------------------------
    def then(self, stage: Stage) -> Pipeline:
        """A new pipeline with ``stage`` appended (pipelines are never changed in place)."""
        return dataclasses.replace(self, stages=[*self.stages, stage])

    def map_batches(
        self, fn: Callable[..., Any] | str, *, batch_format: str = "numpy", name: str | None = None
    ) -> Pipeline:
        """Append ``fn(columns) -> columns`` (vectorised pre/post-processing); see :class:`MapBatches`."""
        return self.then(MapBatches(fn, batch_format=batch_format, name=name))

    def filter(self, fn: Callable[..., Any] | str, *, reason: str | None = None, name: str | None = None) -> Pipeline:
        """Append a filter: requests failing ``fn(columns)`` are answered with an error; see :class:`Filter`."""
        return self.then(Filter(fn, reason=reason, name=name))

    def infer(
        self,
        model: Any = None,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: Sequence[str] | str | None = None,
        name: str | None = None,
        max_batch_size: int | None = None,
    ) -> Pipeline:
        """Append a model call; its outputs join the columns; see :class:`Infer`.

        ``max_batch_size``: most rows in one call of this model (larger batches are cut), e.g.
        bigger for a GPU model; a pipeline without its own ``max_batch_size`` forms batches up
        to the largest stage's.
        """
        return self.then(Infer(model, inputs=inputs, outputs=outputs, name=name, max_batch_size=max_batch_size))

    def ensemble(
        self, models: Sequence[Any], combine: Callable[..., Any] | str | None = None, *, name: str | None = None
    ) -> Pipeline:
        """Append several models on the same inputs and ``combine``; see :class:`Ensemble`."""
        return self.then(Ensemble(models, combine, name=name))

    def route(
        self,
        branches: Mapping[str, Any],
        *,
        weights: Mapping[str, float] | None = None,
        by: str = "random",
        name: str | None = None,
    ) -> Pipeline:
        """Append a split of the traffic between branches (A/B, canary, by key); see :class:`Route`."""
        return self.then(Route(branches, weights=weights, by=by, name=name))

    def canary(self, model: Any, weight: float, *, name: str | None = None) -> Pipeline:
        """Send a share ``weight`` of the requests to ``model``, the rest to the pipeline's ``model``."""
        if not 0 <= weight <= 1:
            raise ConfigError(f"canary weight must be within [0, 1], got {weight}")
        return self.route(
            {"stable": Pipeline(stages=[Infer(None)]), "canary": model},
            weights={"stable": 1 - weight, "canary": weight},
            name=name,
        )

    def shadow(self, branch: Any, *, topic: str | None = None, name: str | None = None) -> Pipeline:
        """Also run ``branch`` on every batch; its results go to ``topic`` (default ``{name}-shadow``), not to
        callers."""
        return self.then(Shadow(branch, topic or f"{self.name or self.inbox}-shadow", name=name))

    def to_topic(self, topic: str) -> Pipeline:
        """Also record the results so far on ``topic``; see :class:`ToTopic`."""
        return self.then(ToTopic(topic))

    # -- resolving ---------------------------------------------------------------------------------
    def effective_stages(self) -> list[Stage]:
        """The stages to run: those composed, or ``infer(model)`` for the one-line form."""
        if not self.stages:
            if self.model is None:
                raise ConfigError(
                    "a pipeline needs stages, or a model: Pipeline(model='mlp') or Pipeline().infer('mlp')"
                )
            return [Infer(None, outputs=self.outputs, strict=True)]
        return [
            _stage_from_entry(s, f"pipeline {self.name or self.inbox!r} stage {i}") for i, s in enumerate(self.stages)
        ]

    def models_used(self) -> list[Any]:
        """Models the stages name (names and Model specs); the default model for ``infer()``."""
        out: list[Any] = []
        for s in self.effective_stages():
            out += s.models()
        if self.model is not None:
            out.append(self.model)
        return out

    def named_models(self) -> list[str]:
        """The models named by string (in stages, the default ``model``, the ``models`` allow-list):
        deployed before the pipeline is."""
        names = [m for m in self.models_used() if isinstance(m, str)] + list(self.models or [])
        return list(dict.fromkeys(names))

    def resolve(self, named: Mapping[str, Mapping[str, Any]] | None = None) -> PipelineSpec:
        """Check the pipeline and resolve its settings here (the deploying client).

        ``named``: what the cluster recorded of the models named by string when they were
        deployed (``{name: {"resources": ..., "max_batch_size": ...}}``, see
        :func:`~daskinfer.models.deploy.placements_async`); with the model specs of the stages, it
        gives the worker resources the partitions need and the largest rows per call asked for.
        """
        from distributed.protocol.pickle import dumps

        name = self.name or self.inbox
        try:
            ref = connector_reference(self.connector)
            plugin = load_connector(ref)
        except ConfigError as e:
            raise ConfigError(f"pipeline {name!r}: {e}") from None
        stages = self.effective_stages()
        for s in stages:
            s.check()
        resources, limits = self._needs(stages, named or {})
        st = PipelineSettings.from_config(self, limits)
        partitions = int(st.inbox_topic["partitions"])
        outputs = [self.outputs] if isinstance(self.outputs, str) else self.outputs
        return PipelineSpec(
            name=name,
            inbox=self.inbox,
            outbox=self.outbox,
            dead_letter=settings.get("pipeline.dead-letter", self.dead_letter) or None,
            partitions=partitions,
            connector=self.connector,
            connector_ref=ref,
            routed=plugin.routed,
            connector_options=dict(self.connector_options),
            model=self.model,
            models=list(self.models) if self.models is not None else None,
            outputs=outputs,
            settings=st,
            stages=dumps(stages),
            reply_prefixes=[*plugin.reply_prefixes, *settings.get("pipeline.reply-prefixes")],
            record_topics=list(dict.fromkeys(t for s in stages for t in s.topics())),
            resources=resources,
            split_reply_prefixes=list(plugin.split_reply_prefixes),
        )

    def _needs(self, stages: list[Stage], named: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, float], list[int]]:
        """The worker resources the partitions need (every model's, merged) and the rows per call
        the infer stages ask for (theirs, else their model's)."""
        specs = [m for s in stages for m in s.models() if not isinstance(m, str)]
        resources = merge_resources(
            *(m.resources for m in specs), *((named.get(n) or {}).get("resources") or {} for n in self.named_models())
        )
        limits = []
        for s in walk(stages):
            if not isinstance(s, Infer):
                continue
            limit = s.batch_limit()
            if limit is None and (s.model is None or isinstance(s.model, str)):
                limit = (named.get(s.model_name or self.model or "") or {}).get("max_batch_size")
            if limit:
                limits.append(int(limit))
        return resources, limits

    # -- running in this process -----------------------------------------------------------------
    async def arun(
        self, inputs: Mapping[str, Any] | np.ndarray, *, registry: ModelRegistry | None = None, errors: str = "raise"
    ) -> dict[str, np.ndarray]:
        """Run the stages in this process on ``inputs`` (columns; each row is one request).

        Models named by string must be loaded in ``registry`` (default: this process's);
        :class:`~daskinfer.models.spec.Model` specs in stages are loaded on first use.

        Parameters
        ----------
        errors : {"raise", "return"}
            ``"raise"``: a :class:`~daskinfer.exceptions.ResultError` naming the first failed row;
            ``"return"``: an ``"error"`` column (None for rows that were answered) is added, and
            the output columns of failed rows are zero.
        """
        from daskinfer.dataflow.run import run_local

        return await run_local(
            self.effective_stages(),
            inputs,
            model=self.model,
            models=self.models,
            outputs=self.outputs,
            registry=registry,
            errors=errors,
        )

    def run(
        self, inputs: Mapping[str, Any] | np.ndarray, *, registry: ModelRegistry | None = None, errors: str = "raise"
    ) -> dict[str, np.ndarray]:
        """Synchronous :meth:`arun`; also from a thread whose event loop runs (a Jupyter cell)."""
        coro = self.arun(inputs, registry=registry, errors=errors)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # an event loop runs here (Jupyter): run ours in a thread of its own and wait for it
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()


__all__ = ["Pipeline"]
