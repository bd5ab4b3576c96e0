"""A pipeline as it is deployed: its settings, resolved once on the deploying client, and the
spec that the scheduler and the workers run it from (plain data, plus the stages as bytes that only
workers load: they came from the deploying client over Dask's comms)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from daskinfer import settings, tracing
from daskinfer.connectors.embedded.topics import TopicSettings
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from daskinfer.dataflow.stages import Stage


class PipelineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's settings, resolved once on the deploying client and shipped with it, so that
    scheduler, workers and clients agree whatever their own config says.

    ``max_batch_size`` is the most rows smart batching puts in a batch; ``model_batch_size`` the
    most rows in one model call of a stage that sets no limit of its own (nor its model).  They
    differ only where a pipeline that sets no ``max_batch_size`` has a stage or model asking for
    bigger calls: its batches grow to that stage's limit, the other stages' calls do not."""

    max_batch_size: int
    model_batch_size: int
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
    control_timeout: float
    rebalance_interval: float
    history: int
    write_bytes: int
    max_restarts: int
    restart_window: float
    restart_backoff: float
    restart_backoff_max: float
    inbox_topic: dict[str, Any]
    retained_topic: dict[str, Any]
    tracing: bool = False  # daskinfer.tracing.enabled on the deploying client: partitions make spans
    trace_sample_ratio: float = 1.0

    @classmethod
    def from_config(cls, pipe: Any, stage_limits: Sequence[int] = ()) -> PipelineSettings:
        """Resolve the settings from arguments and ``daskinfer.*`` config; raise :class:`ConfigError`
        naming the setting when a value has the wrong type or is out of bounds.  ``stage_limits``:
        the rows per call that the stages (or their models) ask for."""
        try:
            return cls._from_config(pipe, stage_limits)
        except (TypeError, ValueError, msgspec.ValidationError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"pipeline {pipe.name or pipe.inbox!r}: invalid setting: {e}") from e

    @classmethod
    def _from_config(cls, pipe: Any, stage_limits: Sequence[int]) -> PipelineSettings:
        policy = BatchPolicy.from_config(pipe.max_batch_size, pipe.max_delay, pipe.max_inflight)
        batch = policy.max_batch_size
        if pipe.max_batch_size is None:  # batches as large as the largest stage asks for
            batch = max([batch, *stage_limits])
        raw = dict(
            max_batch_size=batch,
            model_batch_size=policy.max_batch_size,
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
            control_timeout=settings.get_seconds("pipeline.control-timeout"),
            rebalance_interval=settings.get_seconds("pipeline.rebalance-interval"),
            history=settings.get("dashboard.history"),
            write_bytes=settings.get_bytes("pipeline.max-write-bytes"),
            max_restarts=settings.get("pipeline.max-restarts"),
            restart_window=settings.get_seconds("pipeline.restart-window"),
            restart_backoff=settings.get_seconds("pipeline.restart-backoff"),
            restart_backoff_max=settings.get_seconds("pipeline.restart-backoff-max"),
            inbox_topic=dataclasses.asdict(TopicSettings.from_config("inbox", pipe.partitions)),
            retained_topic=dataclasses.asdict(TopicSettings.from_config("retained")),
            tracing=bool(settings.get("tracing.enabled")),
            trace_sample_ratio=tracing.sample_ratio(),
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
    connector_ref: str  # the connector's plugin, "module:attribute" (workers import it)
    routed: bool  # clients reach the partitions through the controller's routes
    connector_options: dict[str, Any]
    model: str | None
    models: list[str] | None
    outputs: list[str] | None
    settings: PipelineSettings
    stages: bytes  # pickled by the deploying client; never bytes from a broker
    reply_prefixes: list[str]
    record_topics: list[str]  # topics stages record results on (shadow, copies): made at deploy
    # Dask worker resources its partitions' workers must have: the largest amount of each that its models ask for
    resources: dict[str, float] = msgspec.field(default_factory=dict)
    split_reply_prefixes: list[str] = msgspec.field(default_factory=list)  # results written as split messages

    def to_plain(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_plain(cls, spec: Mapping[str, Any]) -> PipelineSpec:
        return msgspec.convert(dict(spec), cls)

    def load_stages(self) -> list[Stage]:
        """The stages (on a worker)."""
        from distributed.protocol.pickle import loads

        return loads(self.stages)  # trusted: written by the deploying client, carried by Dask's own comms
