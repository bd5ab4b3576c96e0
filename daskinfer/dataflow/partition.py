"""One partition of a deployed pipeline, on the worker that serves it.

:class:`PartitionRunner` builds the partition's dataflow (see :mod:`daskinfer.dataflow.nodes`)::

    InboxSource(connector) -> smart_batch -> AnswerBatches(stages) -> WriteResults(connector)

It waits for the pipeline's models to be loaded on this worker, checks what can be
checked before traffic (declared model outputs), and then reads.  Models run in their
own threads, user stage functions in the partition's thread, and the loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from daskinfer import tracing
from daskinfer.connectors.base import Connector
from daskinfer.connectors.registry import load_connector
from daskinfer.dataflow import streams  # noqa: F401  (registers smart_batch on streamz)
from daskinfer.dataflow.nodes import AnswerBatches, InboxSource, WriteResults
from daskinfer.dataflow.results import ResultWriter
from daskinfer.dataflow.spec import PipelineSpec
from daskinfer.dataflow.stages import Infer, Shadow, Stage, StageContext, walk
from daskinfer.dataflow.stats import PartitionStats
from daskinfer.exceptions import ConfigError, ModelNotFoundError
from daskinfer.models.registry import registry_for
from daskinfer.tracing import PartitionTracer

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)


def make_connector(spec: PipelineSpec, worker: Worker, partition: int, epoch: int) -> Connector:
    """The connector of one inbox partition, from the pipeline's connector plugin."""
    return load_connector(spec.connector_ref).partition(spec.to_plain(), worker, partition, epoch)


def _sum_figures(figures: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in figures:
        for k, v in f.items():
            out[k] = out.get(k, 0) + v
    return out


def _model_names(stages: list[Stage], default: str | None) -> list[str]:
    names = []
    for s in stages:
        for m in s.models():
            names.append(m if isinstance(m, str) else m.name)
    if default is not None:
        names.append(default)
    return list(dict.fromkeys(names))


class PartitionRunner:
    """Runs one partition of a pipeline on this worker.

    Attributes
    ----------
    state : str
        ``"starting"``, ``"running"``, ``"stopped"`` or ``"failed"``.
    waiting_for : str or None
        What a starting partition waits for (a model not loaded here yet).
    backlog : int
        Inbox messages not yet taken, as of the last :meth:`status` call (the controller asks
        every control loop tick).
    """

    def __init__(self, worker: Worker, spec: PipelineSpec, partition: int, epoch: int):
        self.worker = worker
        self.spec = spec
        self.partition = partition
        self.epoch = epoch
        self.connector: Connector | None = None
        self.source: InboxSource | None = None
        self.batcher: Any = None
        self.answerer: Any = None
        self.sink: Any = None
        self.started_at = time.time()
        self.starting = True
        self.waiting_for: str | None = None
        self.start_error: BaseException | None = None
        self.fatal = False  # the start failed for a reason a restart cannot mend (configuration)
        self.start_task: asyncio.Future | None = None
        self.backlog = 0
        self.stages: list[Stage] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"daskinfer-{spec.name}-{partition}")

    async def start(self) -> None:
        """Wait for the models, connect, build the dataflow and start reading."""
        try:
            await self._start()
        except Exception as e:
            logger.error("partition %d of pipeline %r failed to start: %s", self.partition, self.spec.name, e)
            self.start_error = e
            self.fatal = isinstance(e, (ConfigError, ModelNotFoundError))
            if self.connector is not None:
                await self.connector.close()
        finally:
            self.starting = False
            self.waiting_for = None

    async def _wait_for_models(self, names: list[str]) -> None:
        registry = registry_for(self.worker)
        deadline = time.monotonic() + self.spec.settings.model_timeout
        for name in names:
            while True:
                try:
                    registry.get(name)
                    break
                except ModelNotFoundError:
                    if time.monotonic() > deadline:
                        raise ModelNotFoundError(name, list(registry.names())) from None
                    self.waiting_for = f"model {name!r} to load on {self.worker.address}"
                    await asyncio.sleep(0.05)
        self.waiting_for = None

    def _check_outputs(self, stages: list[Stage]) -> None:
        registry = registry_for(self.worker)
        for s in stages:
            if isinstance(s, Infer) and s.outputs:
                name = s.model_name or self.spec.model
                dep = registry.get(name) if name else None
                declared = [o.name for o in dep.outputs] if dep is not None and dep.outputs else None
                missing = [o for o in s.outputs if declared is not None and o not in declared]
                if missing:
                    raise ConfigError(
                        f"pipeline {self.spec.name!r}: model {name!r} has no output {missing[0]!r}; "
                        f"its outputs are {declared}"
                    )

    async def _start(self) -> None:
        spec, st = self.spec, self.spec.settings
        stages = spec.load_stages()
        for stage in walk(stages):  # a "module:function" that does not import fails the start (and the deploy)
            stage.resolve_references()
        self.stages = stages
        await self._wait_for_models(_model_names(stages, spec.model))
        self._check_outputs(stages)
        self.connector = make_connector(spec, self.worker, self.partition, self.epoch)
        await self.connector.start()
        context = StageContext(
            registry_for(self.worker),
            default_model=spec.model,
            allowed_models=spec.models,
            max_batch_size=st.model_batch_size,
            executor=self.executor,
            inline_rows=st.inline_rows,
            max_bisect_calls=st.max_bisect_calls,
            install_models=False,
            side=self._record,
        )
        writer = ResultWriter(spec.outbox, spec.dead_letter, spec.reply_prefixes, spec.split_reply_prefixes)
        self.source = InboxSource(
            self.connector, max_messages=st.read_batch, max_request_size=st.max_request_size, max_rows=st.max_batch_size
        )
        self.batcher = self.source.smart_batch(st.max_batch_size, st.max_delay, st.max_inflight)
        self.answerer = AnswerBatches(self.batcher, stages, context, spec.outputs, tracer=self._tracer())
        self.sink = WriteResults(
            self.answerer,
            self.connector,
            writer,
            max_bytes=st.write_bytes,
            stats=self.answerer.stats,
            on_error=self._failed,
        )
        self.source.start()

    def _tracer(self) -> PartitionTracer | None:
        """The partition's batch spans, when the pipeline was deployed with ``daskinfer.tracing.enabled``."""
        st = self.spec.settings
        if not st.tracing:
            return None
        if not tracing.available():
            logger.warning(
                "pipeline %r was deployed with daskinfer.tracing.enabled, but opentelemetry-api is not installed "
                "on this worker (pip install 'daskinfer[tracing]'): partition %d makes no spans",
                self.spec.name,
                self.partition,
            )
            return None
        return PartitionTracer(self.spec.name, self.partition, st.trace_sample_ratio)

    def _record(self, parts: list[Any]) -> None:
        """Results for other topics (a shadow's), written apart from the answers."""
        if self.sink is not None:
            self.sink.record(parts)

    def shadows(self) -> list[Shadow]:
        return [s for s in walk(self.stages) if isinstance(s, Shadow)]

    def _failed(self, exc: BaseException) -> None:
        if self.source is not None:
            self.source.error = exc
            self.source.stop()

    @property
    def stats(self) -> PartitionStats | None:
        """The data path's histograms and errors by type (None until the partition runs)."""
        return self.answerer.stats if self.answerer is not None else None

    @property
    def running(self) -> bool:
        return self.source is not None and not self.source.stopped

    @property
    def state(self) -> str:
        if self.starting:
            return "starting"
        if self.running:
            return "running"
        return "failed" if (self.start_error or (self.source and self.source.error)) else "stopped"

    def idle(self) -> bool:
        """Nothing read is still being answered or written."""
        src = self.source
        return (
            (src is None or src.task is None or src.task.done())
            and (self.batcher is None or self.batcher.idle)
            and (self.answerer is None or self.answerer.running == 0)
            and (self.sink is None or self.sink.idle)
        )

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop reading; with ``drain``, finish and commit what was read first.  What was not
        taken (and, without ``drain``, what was not answered) goes back to the clients."""
        if self.start_task is not None and not self.start_task.done():
            self.start_task.cancel()
        if self.source is not None:
            self.source.stop()
            task = self.source.task
            if not drain:
                if task is not None:
                    task.cancel()
            else:
                end = time.monotonic() + (self.spec.settings.drain_timeout if timeout is None else timeout)
                while time.monotonic() < end and not self.idle():
                    await asyncio.sleep(0.005)
        for shadow in self.shadows():
            shadow.cancel()
        if self.connector is not None:
            await self.connector.close()
        self.executor.shutdown(wait=False)

    def counters(self) -> dict[str, Any]:
        """The partition's counters and gauges now, without I/O (``backlog`` as of the last
        :meth:`status` call); metrics collectors read them at scrape time."""
        src, b, ans, sink = self.source, self.batcher, self.answerer, self.sink
        return {
            "read": src.read_count if src else 0,
            "answered": sink.written if sink else 0,
            "errors": sink.errors if sink else 0,
            "batches": ans.batches if ans else 0,
            "rows": ans.rows if ans else 0,
            "queued_rows": b.queued_rows if b else 0,
            "inflight": b.inflight if b else 0,
            "busy": ans.busy if ans else 0.0,
            "backlog": self.backlog,
            "write_queued_bytes": sink.queued_bytes if sink else 0,
            "writes": sink.writes if sink else 0,
            "internal_errors": ans.failures if ans else 0,
        }

    async def status(self) -> dict[str, Any]:
        src = self.source
        error = self.start_error or (src.error if src is not None else None)
        if self.connector is not None and self.state == "running":
            try:
                self.backlog = await self.connector.backlog()
            except Exception:  # pragma: no cover - a broker hiccup must not break status
                self.backlog = 0
        else:
            self.backlog = 0
        stats = self.stats
        return {
            "pipeline": self.spec.name,
            "partition": self.partition,
            "epoch": self.epoch,
            "worker": self.worker.address,
            "running": self.running,
            "state": self.state,
            "waiting_for": self.waiting_for,
            "fatal": self.fatal,
            **self.counters(),
            "max_batch_size": self.spec.settings.max_batch_size,
            # the models it runs as loaded here: device, execution providers in use, device memory
            "models": registry_for(self.worker).describe(_model_names(self.stages, self.spec.model)),
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            **(stats.snapshot() if stats is not None else {}),
            **({"shadow": _sum_figures(s.figures() for s in self.shadows())} if self.shadows() else {}),
            **(self.connector.describe() if self.connector else {}),
        }
