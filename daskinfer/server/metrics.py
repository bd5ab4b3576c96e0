"""Prometheus metrics of a model server or gateway, served on ``/metrics`` of its REST port.

Needs ``prometheus_client`` (``pip install "daskinfer[metrics]"``).  Each REST front end
has its own registry (several servers may share a process) holding a :class:`V2Collector`,
which reads the service's call statistics at scrape time, and the process collector
(CPU, memory, open files).  Metrics (label ``model``): calls, failed calls by kind
(``BadRequest``, ``Overloaded``, ``TimedOut``, ...), rows, a histogram of call latency,
seconds queued and in the model, model executions, the version served, and the calls in
flight.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import Metric

from daskinfer.control.metrics import Families
from daskinfer.server.service import V2Service


class V2Collector:
    """The calls of one :class:`~daskinfer.server.service.V2Service`, read at scrape time."""

    def __init__(self, service: V2Service):
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        out = Families()
        service = self.service
        out.gauge("daskinfer_v2_ready", "1 while the server takes calls", {}, int(service.ready))
        out.gauge("daskinfer_v2_inflight_requests", "Inference calls in flight", {}, service.inflight)
        for name, model in sorted(service.models().items()):
            model.statistics()  # brings the counters kept elsewhere (batcher) up to date
            st = model.stats
            labels = {"model": name}
            out.gauge(
                "daskinfer_v2_model_info",
                "1 for the version of each model served",
                {**labels, "version": model.version},
                1,
            )
            out.counter(
                "daskinfer_v2_requests",
                "Inference calls (answered or failed)",
                labels,
                st.success_count + st.fail_count,
            )
            for kind, n in sorted(st.errors.items()):
                out.counter(
                    "daskinfer_v2_errors",
                    "Failed inference calls by kind (BadRequest, NotFound, Overloaded, "
                    "Unavailable, TimedOut, InternalError)",
                    {**labels, "kind": kind},
                    n,
                )
            out.counter("daskinfer_v2_rows", "Rows of answered calls", labels, st.rows)
            out.counter("daskinfer_v2_executions", "Model executions (batches)", labels, st.executions)
            out.counter(
                "daskinfer_v2_queue_seconds",
                "Seconds requests waited before their model call",
                labels,
                st.queue_ns / 1e9,
            )
            out.counter("daskinfer_v2_infer_seconds", "Seconds in model calls", labels, st.infer_ns / 1e9)
            out.histogram(
                "daskinfer_v2_request_seconds", "Seconds per inference call, as the server saw it", labels, st.latency
            )
        yield from out


class MetricsEndpoint:
    """The text a ``GET /metrics`` answers for one service (its own registry)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service: V2Service):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(V2Collector(service))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
