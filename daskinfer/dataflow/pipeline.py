"""Pipelines: what users compose, and how it is deployed as partitions.

>>> pipe = (Pipeline(inbox="requests")                              # doctest: +SKIP
...         .map_batches(lambda c: {"x": (c["x"] - mean) / std})
...         .infer("mlp")
...         .map_batches(lambda c: {"label": c["probabilities"].argmax(1)}))
>>> handle = deploy_pipeline(client, pipe)                          # doctest: +SKIP
>>> pipe.run({"x": rows})                                           # doctest: +SKIP

``Pipeline(model="mlp")`` is the one-line form of the simplest pipeline (one model; a
request may name another model, see ``models``).  The same pipeline object runs
in-process (:meth:`Pipeline.run`, or on a streamz ``Stream`` with ``run_pipeline``) and
deploys as partitions with :func:`deploy_pipeline`: each inbox partition is served by a
runner on a worker (:mod:`daskinfer.dataflow.partition`); the scheduler only assigns
partitions and moves them when workers join or leave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from daskinfer import config_check, settings
from daskinfer.connectors.direct.endpoint import REPLY_PREFIX as DIRECT_PREFIX
from daskinfer.connectors.embedded.broker import REPLY_PREFIX as TOPIC_PREFIX
from daskinfer.connectors.embedded.broker import BrokerRPC, TopicSettings, ensure_broker_async
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.dataflow.stages import (
    Ensemble,
    Filter,
    Infer,
    MapBatches,
    Route,
    Shadow,
    Stage,
    ToTopic,
)
from daskinfer.exceptions import ConfigError, DaskInferError

if TYPE_CHECKING:
    from distributed import Client

    from daskinfer.models.registry import ModelRegistry

CONNECTORS = ("embedded", "redis", "kafka")


class PipelineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's settings, resolved once on the deploying client and shipped with it, so that
    scheduler, workers and clients agree whatever their own config says."""

    max_batch_size: int
    max_delay: float
    max_inflight: int
    read_batch: int
    read_bytes: int
    max_request_size: int
    direct_max_messages: int
    direct_max_bytes: int
    inline_rows: int
    max_bisect_calls: int
    model_timeout: float
    drain_timeout: float
    write_bytes: int
    max_restarts: int
    restart_window: float
    restart_backoff: float
    restart_backoff_max: float
    inbox_topic: dict[str, Any]
    retained_topic: dict[str, Any]

    @classmethod
    def from_config(cls, pipe: Pipeline) -> PipelineSettings:
        """Resolve the settings from arguments and ``daskinfer.*`` config; raise :class:`ConfigError`
        naming the setting when a value has the wrong type or is out of bounds."""
        try:
            return cls._from_config(pipe)
        except (TypeError, ValueError, msgspec.ValidationError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"pipeline {pipe.name or pipe.inbox!r}: invalid setting: {e}") from e

    @classmethod
    def _from_config(cls, pipe: Pipeline) -> PipelineSettings:
        policy = BatchPolicy.from_config(pipe.max_batch_size, pipe.max_delay, pipe.max_inflight)
        raw = dict(
            max_batch_size=policy.max_batch_size,
            max_delay=policy.max_delay,
            max_inflight=policy.max_inflight,
            read_batch=settings.get("broker.get-batch", pipe.read_batch),
            read_bytes=settings.get_bytes("broker.read-bytes"),
            max_request_size=settings.get_bytes("codec.max-message-size", pipe.max_request_size),
            direct_max_messages=settings.get("direct.max-queued-messages"),
            direct_max_bytes=settings.get_bytes("direct.max-queued-bytes"),
            inline_rows=settings.get("pipeline.inline-rows"),
            max_bisect_calls=settings.get("pipeline.max-bisect-calls"),
            model_timeout=settings.get_seconds("pipeline.model-timeout"),
            drain_timeout=settings.get_seconds("pipeline.drain-timeout"),
            write_bytes=settings.get_bytes("pipeline.max-write-bytes"),
            max_restarts=settings.get("pipeline.max-restarts"),
            restart_window=settings.get_seconds("pipeline.restart-window"),
            restart_backoff=settings.get_seconds("pipeline.restart-backoff"),
            restart_backoff_max=settings.get_seconds("pipeline.restart-backoff-max"),
            inbox_topic=dataclasses.asdict(TopicSettings.from_config("inbox", pipe.partitions)),
            retained_topic=dataclasses.asdict(TopicSettings.from_config("retained")),
        )
        out = msgspec.convert(raw, cls, strict=True)  # types checked: "many" is not a count
        for k in (
            "read_batch",
            "read_bytes",
            "max_request_size",
            "direct_max_messages",
            "direct_max_bytes",
            "write_bytes",
            "max_restarts",
        ):
            if getattr(out, k) < 1:
                raise ConfigError(f"pipeline setting {k} must be >= 1, got {getattr(out, k)}")
        return out


class PipelineSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A deployed pipeline as the scheduler and workers see it (plain data, plus the stages
    as bytes that only workers load: they came from the deploying client over Dask's comms)."""

    name: str
    inbox: str
    outbox: str
    dead_letter: str | None
    partitions: int
    connector: str
    connector_options: dict[str, Any]
    model: str | None
    models: list[str] | None
    outputs: list[str] | None
    settings: PipelineSettings
    stages: bytes  # pickled by the deploying client; never bytes from a broker
    reply_prefixes: list[str]
    record_topics: list[str]  # topics stages record results on (shadow, copies): made at deploy

    def to_plain(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_plain(cls, spec: Mapping[str, Any]) -> PipelineSpec:
        return msgspec.convert(dict(spec), cls)

    def load_stages(self) -> list[Stage]:
        """The stages (on a worker)."""
        from distributed.protocol.pickle import loads

        return loads(self.stages)  # trusted: written by the deploying client, carried by Dask's own comms


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
    connector : {"embedded", "redis", "kafka"}
        Where the inbox and outbox live.
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
    ) -> Pipeline:
        """Append a model call; its outputs join the columns; see :class:`Infer`."""
        return self.then(Infer(model, inputs=inputs, outputs=outputs, name=name))

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

    def resolve(self) -> PipelineSpec:
        """Check the pipeline and resolve its settings here (the deploying client)."""
        from distributed.protocol.pickle import dumps

        name = self.name or self.inbox
        if self.connector not in CONNECTORS:
            raise ConfigError(f"pipeline {name!r}: unknown connector {self.connector!r}; expected one of {CONNECTORS}")
        stages = self.effective_stages()
        for s in stages:
            s.check()
        st = PipelineSettings.from_config(self)
        partitions = int(st.inbox_topic["partitions"])
        outputs = [self.outputs] if isinstance(self.outputs, str) else self.outputs
        return PipelineSpec(
            name=name,
            inbox=self.inbox,
            outbox=self.outbox,
            dead_letter=settings.get("pipeline.dead-letter", self.dead_letter) or None,
            partitions=partitions,
            connector=self.connector,
            connector_options=dict(self.connector_options),
            model=self.model,
            models=list(self.models) if self.models is not None else None,
            outputs=outputs,
            settings=st,
            stages=dumps(stages),
            reply_prefixes=[DIRECT_PREFIX, TOPIC_PREFIX, *settings.get("pipeline.reply-prefixes")],
            record_topics=list(dict.fromkeys(t for s in stages for t in s.topics())),
        )

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

        return await run_local(self, inputs, registry=registry, errors=errors)

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


class PipelineHandle:
    """A deployed pipeline: its status, and how to stop it."""

    def __init__(self, client: Client, spec: PipelineSpec | Mapping[str, Any]):
        self.client = client
        self.spec = spec if isinstance(spec, PipelineSpec) else None
        self.name: str = spec.name if isinstance(spec, PipelineSpec) else spec["name"]
        self.inbox: str = spec.inbox if isinstance(spec, PipelineSpec) else spec["inbox"]
        self.partitions: int = spec.partitions if isinstance(spec, PipelineSpec) else spec["partitions"]
        self._stopped = False

    def status(self) -> dict[str, Any]:
        """Assignments and per-partition figures (read, answered, errors, queued...).

        A stopped pipeline's status is ``{"name": ..., "state": "stopped"}``.
        """
        return self.client.sync(self._status)

    async def _status(self) -> dict[str, Any]:
        return await self.client.scheduler.daskinfer_pipeline_status(name=self.name)

    async def _wait_ready(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            st = await self._status()
            runners = st.get("runners", [])
            running = [r for r in runners if r.get("state") == "running"]
            if len(running) == st.get("partitions", -1):
                return st
            failed = [r for r in runners if r.get("state") == "failed" and r.get("fatal")]
            if failed:
                await self._stop(drain=False)
                raise ConfigError(f"pipeline {self.name!r} cannot start: {failed[0]['error']}")
            if time.monotonic() > end:
                why = [r.get("error") for r in runners if r.get("error")] or list(st.get("failures", {}).values())
                starting = [r for r in runners if r.get("state") == "starting"]
                waiting = starting[0].get("waiting_for") if starting else None
                raise TimeoutError(
                    f"pipeline {self.name!r}: {len(running)} of {st.get('partitions')} partitions running after "
                    f"{timeout:g}s"
                    + (f"; waiting for {waiting}" if waiting else "")
                    + (f"; errors: {why}" if why else "")
                )
            await asyncio.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every partition has a running runner."""
        return self.client.sync(self._wait_ready, timeout)

    async def _stop(self, drain: bool) -> bool:
        self._stopped = True
        return await self.client.scheduler.daskinfer_pipeline_stop(name=self.name, drain=drain)

    def stop(self, drain: bool = True) -> bool:
        """Stop all runners; with ``drain`` they finish and commit what they read first.

        Stopping a stopped pipeline does nothing; returns whether it was running.
        """
        return self.client.sync(self._stop, drain)

    def __enter__(self) -> PipelineHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PipelineHandle {self.name!r} inbox={self.inbox!r} partitions={self.partitions}>"


async def _deploy_models(client: Client, pipe: Pipeline) -> None:
    """Deploy Model specs named in stages unless that name and version are deployed already; check
    that the models named by string are deployed (a missing one fails here, naming it)."""
    from daskinfer.models.deploy import _deploy, deployed_async

    deployed = await deployed_async(client)
    for m in pipe.models_used():
        if isinstance(m, str):
            continue
        if m.version not in deployed.get(m.name, []):
            await _deploy(client, m, True)
            deployed.setdefault(m.name, []).append(m.version)
    missing = [m for m in pipe.models_used() if isinstance(m, str) and m not in deployed]
    if missing:
        raise ConfigError(
            f"pipeline {pipe.name or pipe.inbox!r}: model {missing[0]!r} is not deployed; deploy it first "
            f"(daskinfer.deploy(client, OnnxModel({missing[0]!r}, path))) or give the stage a model spec "
            f"(pipe.infer(OnnxModel(...))); deployed models: {sorted(deployed) or 'none'}"
        )


async def _prepare_embedded(client: Client, spec: PipelineSpec) -> None:
    broker = BrokerRPC(client.scheduler)
    inbox = TopicSettings(**spec.settings.inbox_topic)
    have = await broker.create_topic(spec.inbox, inbox)
    if have.partitions != spec.partitions:
        info = await broker.info(spec.inbox)
        waiting = sum(e - s for s, e in zip(info["start"], info["end"]))
        if waiting:
            raise ConfigError(
                f"pipeline {spec.name!r}: inbox topic {spec.inbox!r} exists with {have.partitions} partitions, "
                f"not {spec.partitions}, and holds {waiting} unprocessed requests; deploy with "
                f"partitions={have.partitions}, or delete the topic (daskinfer.delete_topic(client, {spec.inbox!r}))"
            )
        await broker.delete_topic(spec.inbox)  # empty: made again with the pipeline's partitions
        await broker.create_topic(spec.inbox, inbox)
    retained = TopicSettings(**spec.settings.retained_topic)
    for t in (spec.outbox, spec.dead_letter, *spec.record_topics):
        if t:
            await broker.create_topic(t, dataclasses.replace(retained, partitions=1))


async def _deploy_pipeline(client: Client, pipeline: Pipeline, wait: bool, timeout: float) -> PipelineHandle:
    config_check.raise_unknown(where=f"deploy_pipeline {pipeline.name or pipeline.inbox!r}: the Dask config")
    spec = pipeline.resolve()
    await ensure_broker_async(client)
    from daskinfer.control.runtime import ensure_runtime_async

    await ensure_runtime_async(client)
    await _deploy_models(client, pipeline)
    if spec.connector == "embedded":
        await _prepare_embedded(client, spec)
    elif spec.connector == "redis":
        from daskinfer.connectors.redis import prepare_streams

        plain = spec.to_plain()
        await prepare_streams(plain, timeout=timeout)
        spec = msgspec.structs.replace(
            spec, connector_options={**spec.connector_options, "redis_generation": plain["redis_generation"]}
        )
    elif spec.connector == "kafka":
        from daskinfer.connectors.kafka import prepare

        plain = spec.to_plain()
        await prepare(plain)  # settles the options (exactly once where the brokers run transactions)
        spec = msgspec.structs.replace(spec, connector_options=plain["connector_options"])
    await client.scheduler.daskinfer_pipeline_start(spec=spec.to_plain())
    handle = PipelineHandle(client, spec)
    if wait:
        await handle._wait_ready(timeout)
    return handle


def deploy_pipeline(client: Client, pipeline: Pipeline, *, wait: bool = True, timeout: float = 60.0):
    """Start ``pipeline`` on ``client``'s cluster; return a :class:`PipelineHandle`.

    Model specs used by its stages are deployed first (unless that version is deployed).

    Parameters
    ----------
    wait : bool
        Return once every partition runs.
    timeout : float
        Seconds to wait for that, and at most for the connector's broker to answer
        (a Redis that cannot be reached fails at once).

    Raises
    ------
    ConfigError
        The pipeline is wrong (unknown connector, a stage that cannot run, a model that is not
        deployed, an output the model does not have, a misspelt key under ``daskinfer:`` in the
        Dask config...); nothing stays deployed.
    """
    return client.sync(_deploy_pipeline, client, pipeline, wait, timeout)


# -- administration ------------------------------------------------------------------------------
def pipelines(client: Client) -> dict[str, dict[str, Any]]:
    """The pipelines running on ``client``'s cluster: name -> inbox, partitions, connector, assignments."""
    return client.sync(_list_pipelines, client)


async def _list_pipelines(client: Client) -> dict[str, dict[str, Any]]:
    await ensure_broker_async(client)
    return await client.scheduler.daskinfer_pipeline_list()


def get_pipeline(client: Client, name: str) -> PipelineHandle:
    """A handle on the running pipeline ``name`` (e.g. one that ``daskinfer run`` deployed)."""
    listed = pipelines(client)
    if name not in listed:
        raise KeyError(f"no pipeline named {name!r} is running; running: {sorted(listed) or 'none'}")
    return PipelineHandle(client, {"name": name, **listed[name]})


def topics(client: Client) -> dict[str, dict[str, Any]]:
    """The embedded broker's topics: name -> partitions, messages, bytes, dropped, kind."""

    async def _topics() -> dict[str, dict[str, Any]]:
        await ensure_broker_async(client)
        return await BrokerRPC(client.scheduler).list_topics()

    return client.sync(_topics)


def delete_topic(client: Client, name: str) -> bool:
    """Delete an embedded broker topic and what it holds; returns whether it existed.

    Raises :class:`~daskinfer.exceptions.DaskInferError` if a running pipeline reads it.
    """

    async def _delete() -> bool:
        await ensure_broker_async(client)
        for pname, p in (await client.scheduler.daskinfer_pipeline_list()).items():
            if p["inbox"] == name:
                raise DaskInferError(f"topic {name!r} is the inbox of running pipeline {pname!r}; stop it first")
        return await BrokerRPC(client.scheduler).delete_topic(name)

    return client.sync(_delete)


__all__ = [
    "Pipeline",
    "PipelineHandle",
    "PipelineSettings",
    "PipelineSpec",
    "delete_topic",
    "deploy_pipeline",
    "get_pipeline",
    "pipelines",
    "topics",
]
