"""Deploy an inference pipeline: inbox -> smart batching -> model -> outbox, as partitions.

>>> pipe = Pipeline(model="mlp", inbox="requests", outbox="results", partitions=4)
>>> handle = deploy_pipeline(client, pipe)   # doctest: +SKIP
>>> handle.status()                          # doctest: +SKIP
>>> handle.stop()                            # doctest: +SKIP

Each inbox partition is served by one partition runner on a worker (see
:mod:`daskinfer.dataflow.partition`); the scheduler only assigns partitions and moves them
when workers join or leave.  Processing is at-least-once (a message is committed
after its result is written); results carry the request id so that clients
deliver each answer once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from daskinfer import settings
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.connectors.embedded import BrokerRPC, _ensure_broker
from daskinfer.exceptions import ConfigError
from daskinfer.dataflow.partition import RUNTIME_PLUGIN, RuntimePlugin

if TYPE_CHECKING:
    from distributed import Client


@dataclass
class Pipeline:
    """What a deployed pipeline does.

    Parameters
    ----------
    model : str, optional
        Default model (deployed with :func:`daskinfer.deploy`); a request may name another.
    inbox, outbox : str
        Topics to read requests from and to write results to (when a request has no ``reply_to``).
    name : str, optional
        Pipeline name (default: the inbox's name); it is also the inbox consumer group.
    partitions : int, optional
        Inbox partitions, one runner each; config ``daskinfer.pipeline.partitions``.
    max_batch_size, max_delay, max_inflight : optional
        Smart batching per partition; config ``daskinfer.batching.*``.
    outputs : list of str, optional
        Model outputs to return (default: all).
    dead_letter : str, optional
        Topic that keeps failed requests' raw bytes; config ``daskinfer.pipeline.dead-letter``.
    read_batch : int, optional
        Most messages one read takes from the inbox; config ``daskinfer.broker.get-batch``.
    max_request_size : int or str, optional
        Largest request accepted (e.g. ``"1MiB"``); larger ones get an error result.
        Config ``daskinfer.codec.max-message-size``.
    connector : {"embedded", "redis", "kafka"}
        Where the inbox and outbox live.
    connector_options : dict
        Connector settings (e.g. ``{"url": "redis://127.0.0.1:6379/0"}``,
        ``{"bootstrap_servers": "127.0.0.1:9092", "exactly_once": True}``).
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

    def to_spec(self) -> dict[str, Any]:
        """The plain-data form sent to the scheduler and workers (no pickled code)."""
        spec = asdict(self)
        spec["name"] = self.name or self.inbox
        spec["partitions"] = int(settings.get("pipeline.partitions", self.partitions))
        spec["dead_letter"] = settings.get("pipeline.dead-letter", self.dead_letter)
        # settle batching and limits here, so the deployer's config governs every worker
        spec["max_batch_size"] = int(settings.get("batching.max-batch-size", self.max_batch_size))
        spec["max_delay"] = settings.get_seconds("batching.max-delay", self.max_delay)
        spec["max_inflight"] = int(settings.get("batching.max-inflight", self.max_inflight))
        spec["read_batch"] = int(settings.get("broker.get-batch", self.read_batch))
        spec["max_request_size"] = settings.get_bytes("codec.max-message-size", self.max_request_size)
        BatchPolicy(spec["max_batch_size"], spec["max_delay"], spec["max_inflight"])  # checks the values
        if spec["partitions"] < 1:
            raise ConfigError(f"pipeline {spec['name']!r}: partitions must be >= 1, got {spec['partitions']}")
        if self.connector not in ("embedded", "redis", "kafka"):
            raise ConfigError(f"pipeline {spec['name']!r}: unknown connector {self.connector!r} (embedded, redis, kafka)")
        if isinstance(self.outputs, str):
            spec["outputs"] = [self.outputs]
        return spec


class PipelineHandle:
    """A running pipeline: its status, and how to stop it."""

    def __init__(self, client: Client, spec: dict[str, Any]):
        self.client = client
        self.spec = spec
        self.name = spec["name"]

    def status(self):
        """Assignments and per-partition runner figures (read, answered, errors, queue)."""
        return self.client.sync(self.client.scheduler.daskinfer_pipeline_status, name=self.name)

    async def _wait_ready(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            st = await self.client.scheduler.daskinfer_pipeline_status(name=self.name)
            running = [r for r in st["runners"] if r.get("state") == "running"]
            if len(running) == st["partitions"]:
                return st
            if time.monotonic() > end:
                raise TimeoutError(
                    f"pipeline {self.name!r}: {len(running)} of {st['partitions']} partitions running after "
                    f"{timeout:g}s; failures: {st['failures']}"
                )
            await asyncio.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0):
        """Wait until every partition has a running runner."""
        return self.client.sync(self._wait_ready, timeout)

    def stop(self, drain: bool = True):
        """Stop all runners; with ``drain`` they finish and commit what they read first."""
        return self.client.sync(self.client.scheduler.daskinfer_pipeline_stop, name=self.name, drain=drain)

    def __enter__(self) -> PipelineHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PipelineHandle {self.name!r} inbox={self.spec['inbox']!r} partitions={self.spec['partitions']}>"


async def _deploy_pipeline(client: Client, pipeline: Pipeline, wait: bool, timeout: float) -> PipelineHandle:
    spec = pipeline.to_spec()
    await _ensure_broker(client)
    await client._register_worker_plugin(RuntimePlugin(), RUNTIME_PLUGIN, idempotent=True)
    if pipeline.connector == "embedded":
        broker = BrokerRPC(client.scheduler)
        n = await broker.create_topic(spec["inbox"], spec["partitions"])
        if n != spec["partitions"]:
            raise ConfigError(
                f"pipeline {spec['name']!r}: topic {spec['inbox']!r} exists with {n} partitions, "
                f"not {spec['partitions']}"
            )
        await broker.create_topic(spec["outbox"])
        if spec["dead_letter"]:
            await broker.create_topic(spec["dead_letter"])
    elif pipeline.connector == "kafka":
        from daskinfer.connectors.kafka import prepare

        await prepare(spec)
    else:
        from daskinfer.connectors.redis import prepare_streams

        await prepare_streams(spec)
    await client.scheduler.daskinfer_pipeline_start(spec=spec)
    handle = PipelineHandle(client, spec)
    if wait:
        await handle._wait_ready(timeout)
    return handle


def deploy_pipeline(client: Client, pipeline: Pipeline, *, wait: bool = True, timeout: float = 60.0):
    """Start ``pipeline`` on ``client``'s cluster; return a :class:`PipelineHandle`.

    Parameters
    ----------
    wait : bool
        Return once every partition runs (the model must be deployed).
    timeout : float
        Seconds to wait for that.
    """
    return client.sync(_deploy_pipeline, client, pipeline, wait, timeout)
