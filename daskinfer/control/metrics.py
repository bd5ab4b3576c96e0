"""Prometheus metrics of the workers and the scheduler, read from live state at scrape time.

Needs ``prometheus_client`` (``pip install "daskinfer[metrics]"``).  Dask serves the
process's global ``prometheus_client.REGISTRY`` on ``/metrics`` of every worker and of the
scheduler (its HTTP server); this module registers one collector per process there, as
distributed's own collectors are, and each scrape reads the partitions, models and pipelines
as they are at that moment.  Nothing is counted twice: the data path keeps its counters and
histograms (:mod:`daskinfer.dataflow.stats`), the collectors only read them.

Workers (:class:`WorkerCollector`): per partition (labels ``worker``, ``pipeline``,
``partition``) requests, errors by type, rows, batches, in-flight batches, queued rows,
inbox backlog, and histograms of batch size, queue wait, inference time and latency; per
model the version loaded, with the device and execution provider in use (``daskinfer_model_info``)
and, where NVML reads it, the memory of its GPU; per remote model calls, attempts, retries, failures and the
circuit breaker's state.  The scheduler (:class:`SchedulerCollector`): per pipeline the
partitions placed, moves, restarts, totals over every runner it had, lag per partition and
the p50/p99 latency of the last sample; per topic of the embedded broker the messages and bytes
it holds and the messages it dropped by retention.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from daskinfer.connectors.embedded.broker import EXTENSION as BROKER
from daskinfer.dataflow.stats import Histogram
from daskinfer.exceptions import ModelNotFoundError
from daskinfer.models.registry import registry_for
from daskinfer.models.remote_loaded import LoadedRemote
from daskinfer.remote.retry import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from daskinfer.control.controller import ControllerExtension
    from daskinfer.control.runtime import PartitionsExtension

BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)


def histogram_buckets(hist: Histogram) -> list[tuple[str, float]]:
    """``(le, cumulative count)`` pairs of ``hist``, ending with ``+Inf``."""
    cum = np.cumsum(hist.counts).tolist()
    return [(floatToGoString(b), c) for b, c in zip(hist.bounds.tolist(), cum)] + [("+Inf", cum[-1])]


class Families:
    """Metric families made on first use, so that a collector adds samples in one line each."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _family(self, cls: type, name: str, doc: str, labels: Iterable[str]) -> Any:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = cls(name, doc, labels=list(labels))
        return fam

    def counter(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(CounterMetricFamily, name, doc, labels).add_metric(list(labels.values()), value)

    def gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        self._family(GaugeMetricFamily, name, doc, labels).add_metric(list(labels.values()), value)

    def histogram(self, name: str, doc: str, labels: dict[str, str], hist: Histogram) -> None:
        self._family(HistogramMetricFamily, name, doc, labels).add_metric(
            list(labels.values()), histogram_buckets(hist), hist.sum
        )

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class WorkerCollector:
    """The daskinfer figures of every worker in this process (one collector per process)."""

    def __init__(self) -> None:
        self.watched: weakref.WeakSet[PartitionsExtension] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        return []  # names vary with what runs; nothing to check against other collectors

    def collect(self) -> Iterator[Metric]:
        out = Families()
        for ext in list(self.watched):
            worker = ext.worker.address
            if worker is None:
                continue
            for (pipeline, partition), runner in list(ext.runners.items()):
                self._partition(out, {"worker": worker, "pipeline": pipeline, "partition": str(partition)}, runner)
            self._models(out, worker, registry_for(ext.worker))
        yield from out

    @staticmethod
    def _partition(out: Families, labels: dict[str, str], runner: Any) -> None:
        c = runner.counters()
        out.gauge("daskinfer_partition_up", "1 while the partition runs on this worker", labels, runner.running)
        out.counter("daskinfer_requests", "Requests answered (with outputs or an error)", labels, c["answered"])
        out.counter("daskinfer_rows", "Rows answered", labels, c["rows"])
        out.counter("daskinfer_batches", "Batches answered", labels, c["batches"])
        out.counter(
            "daskinfer_messages_read", "Inbox messages read (a message holds one or more requests)", labels, c["read"]
        )
        out.counter("daskinfer_model_busy_seconds", "Seconds spent in model calls", labels, c["busy"])
        out.gauge("daskinfer_inflight_batches", "Batches being answered or written", labels, c["inflight"])
        out.gauge("daskinfer_queued_rows", "Rows read and waiting for a batch", labels, c["queued_rows"])
        out.gauge(
            "daskinfer_inbox_backlog",
            "Inbox messages not yet taken by the partition (as of the controller's last poll)",
            labels,
            c["backlog"],
        )
        stats = runner.stats
        if stats is None:
            return
        for error_type, n in stats.errors.items():
            out.counter(
                "daskinfer_errors",
                "Requests answered with an error, by error type",
                {**labels, "error_type": error_type},
                n,
            )
        out.histogram("daskinfer_batch_rows", "Rows per batch", labels, stats.batch_rows)
        out.histogram(
            "daskinfer_queue_wait_seconds",
            "Seconds from a request's read until its batch started",
            labels,
            stats.queue_wait,
        )
        out.histogram(
            "daskinfer_inference_seconds",
            "Seconds per batch in the pipeline's stages (models included)",
            labels,
            stats.inference,
        )
        out.histogram(
            "daskinfer_request_latency_seconds",
            "Seconds from a request's read until its answer was written",
            labels,
            stats.latency,
        )

    @staticmethod
    def _models(out: Families, worker: str, registry: Any) -> None:
        for name, version in registry.names().items():
            try:
                dep = registry.get(name)
            except ModelNotFoundError:  # retired since names() (loading runs in a thread)
                continue
            kind = getattr(dep.model, "kind", "")
            info = dep.first.describe()
            device = str(info.get("device") or "")
            out.gauge(
                "daskinfer_model_info",
                "1 for each model version loaded and current on this worker, with its device and the execution "
                "provider in use (ONNX)",
                {
                    "worker": worker,
                    "model": name,
                    "version": version,
                    "kind": kind,
                    "device": device,
                    "provider": str(info.get("provider") or ""),
                },
                1,
            )
            for what, value in (info.get("device_memory") or {}).items():
                out.gauge(
                    "daskinfer_model_device_memory_bytes",
                    "Memory of the GPU a model runs on (the whole device, as NVML reads it): used and total",
                    {"worker": worker, "model": name, "device": device, "kind": what},
                    value,
                )
            remotes = [i for i in dep.instances if isinstance(i, LoadedRemote)]
            if remotes:
                WorkerCollector._remote(out, {"worker": worker, "model": name, "service": remotes[0].service}, remotes)

    @staticmethod
    def _remote(out: Families, labels: dict[str, str], remotes: list[LoadedRemote]) -> None:
        def total(field: str) -> int:
            return sum(getattr(r.stats, field) for r in remotes)

        out.counter(
            "daskinfer_remote_calls",
            "Calls to a remote model service (one per chunk of a batch)",
            labels,
            total("calls"),
        )
        out.counter(
            "daskinfer_remote_attempts", "Attempts of remote calls, retries included", labels, total("attempts")
        )
        out.counter(
            "daskinfer_remote_retries", "Remote calls tried again after a retryable failure", labels, total("retries")
        )
        out.counter("daskinfer_remote_failures", "Remote calls that failed for good", labels, total("failures"))
        out.counter(
            "daskinfer_remote_fast_failures",
            "Remote calls refused at once by an open circuit breaker",
            labels,
            total("fast_failures"),
        )
        out.counter("daskinfer_remote_rows", "Rows sent to remote model services", labels, total("rows"))
        out.counter(
            "daskinfer_remote_breaker_opened",
            "Times the circuit breaker opened",
            labels,
            sum(r.breaker.times_opened for r in remotes),
        )
        states = {r.breaker.state for r in remotes}
        for state in BREAKER_STATES:
            out.gauge(
                "daskinfer_remote_breaker_state",
                "1 for the circuit breaker's state (closed, open, half-open)",
                {**labels, "state": state},
                int(state in states),
            )


class SchedulerCollector:
    """The pipelines of every controller in this process (one collector per process)."""

    def __init__(self) -> None:
        self.watched: weakref.WeakSet[ControllerExtension] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        out = Families()
        for controller in list(self.watched):
            for name, state in list(controller.pipelines.items()):
                labels = {"pipeline": name}
                out.gauge(
                    "daskinfer_pipeline_partitions", "Partitions of the pipeline's inbox", labels, state.partitions
                )
                out.gauge(
                    "daskinfer_pipeline_partitions_placed", "Partitions with a worker", labels, len(state.assigned)
                )
                out.gauge(
                    "daskinfer_pipeline_partitions_failed",
                    "Partitions that failed to start",
                    labels,
                    len(state.failures),
                )
                out.counter("daskinfer_pipeline_moves", "Partitions moved to another worker", labels, state.moves)
                out.counter(
                    "daskinfer_pipeline_restarts",
                    "Partitions restarted after their runner stopped",
                    labels,
                    state.restarts,
                )
                totals = state.totals()
                out.counter(
                    "daskinfer_pipeline_requests",
                    "Requests answered, over every runner the pipeline had",
                    labels,
                    totals["answered"],
                )
                out.counter("daskinfer_pipeline_errors", "Requests answered with an error", labels, totals["errors"])
                out.counter("daskinfer_pipeline_rows", "Rows answered", labels, totals["rows"])
                out.counter("daskinfer_pipeline_batches", "Batches answered", labels, totals["batches"])
                for p, fig in sorted(state.figures.items()):
                    out.gauge(
                        "daskinfer_pipeline_lag",
                        "Requests waiting in a partition: inbox backlog plus rows "
                        "queued for a batch (as of the last poll)",
                        {**labels, "partition": str(p)},
                        (fig.get("backlog", 0) or 0) + (fig.get("queued_rows", 0) or 0),
                    )
                last = state.series.points[-1] if state.series.points else None
                for q in ("p50", "p99"):
                    value = getattr(last, q) if last is not None else None
                    if value is not None:
                        out.gauge(
                            f"daskinfer_pipeline_latency_{q}_seconds",
                            f"{q} of the latency from read to written over the last sampling interval",
                            labels,
                            value,
                        )
            broker = controller.scheduler.extensions.get(BROKER)
            if broker is not None:
                self._topics(out, broker)
        yield from out

    @staticmethod
    def _topics(out: Families, broker: Any) -> None:
        for name, topic in list(broker.topics.items()):
            labels = {"topic": name}
            out.gauge(
                "daskinfer_topic_messages",
                "Messages held by a topic of the embedded broker",
                labels,
                sum(len(log) for log in topic.logs),
            )
            out.gauge(
                "daskinfer_topic_bytes",
                "Bytes held by a topic of the embedded broker",
                labels,
                sum(log.bytes for log in topic.logs),
            )
            out.counter(
                "daskinfer_topic_dropped",
                "Messages a topic dropped by retention (count, bytes or age)",
                labels,
                topic.dropped,
            )


_lock = threading.Lock()
_collectors: dict[type, Any] = {}


def _collector(cls: type) -> Any:
    """This process's one collector of class ``cls``, registered with prometheus_client's global registry."""
    with _lock:
        collector = _collectors.get(cls)
        if collector is None:
            collector = _collectors[cls] = cls()
            prometheus_client.REGISTRY.register(collector)
        return collector


def watch_worker(extension: PartitionsExtension) -> None:
    """Export the partitions and models of ``extension``'s worker on this process's ``/metrics``."""
    _collector(WorkerCollector).watched.add(extension)


def watch_controller(controller: ControllerExtension) -> None:
    """Export the pipelines of ``controller`` on this process's ``/metrics``."""
    _collector(SchedulerCollector).watched.add(controller)
