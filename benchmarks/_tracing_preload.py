"""``dask worker --preload`` of the tracing benchmark: the OpenTelemetry SDK, spans recorded and
batched as an exporter would get them, then dropped (the cost measured is daskinfer's and the SDK's,
not a collector's)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class DropSpans(SpanExporter):
    """Takes every span and keeps none."""

    def export(self, spans):  # noqa: ANN001, ANN201 - the SDK's signature
        return SpanExportResult.SUCCESS


def dask_setup(worker) -> None:  # noqa: ANN001 - dask's preload hook
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(provider)
