"""OpenTelemetry for daskinfer's spans on a Dask worker (or scheduler, gateway): an OTLP exporter.

    pip install "daskinfer[tracing]" opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc
    DASK_DASKINFER__TRACING__ENABLED=true dask worker tcp://scheduler:8786 --preload conf/tracing_preload.py

The exporter follows OpenTelemetry's own environment variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
default ``http://localhost:4317``; ``OTEL_SERVICE_NAME``, default ``daskinfer-worker`` here), so an
OpenTelemetry Collector, Jaeger (``jaegertracing/all-in-one``, OTLP on 4317) or Grafana Tempo
receives the spans.  Without the exporter package the spans are printed to the worker's log instead
(a check that the wiring works).  Tracing itself is switched on where the pipeline is deployed
(``daskinfer.tracing.enabled: true``): see the README, "Tracing".
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def tracer_provider() -> TracerProvider:
    """A provider that exports over OTLP when the exporter is installed, else to the console."""
    name = os.environ.get("OTEL_SERVICE_NAME", "daskinfer-worker")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        exporter = ConsoleSpanExporter()
    else:
        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def dask_setup(server) -> None:  # noqa: ANN001 - dask's preload hook (a worker, nanny or scheduler)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # one provider per process
        trace.set_tracer_provider(tracer_provider())


def dask_teardown(server) -> None:  # noqa: ANN001
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()  # flushes the spans not yet exported
