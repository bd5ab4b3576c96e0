"""OpenTelemetry tracing through the OpenTelemetry API (the ``tracing`` extra: ``opentelemetry-api``).

daskinfer records spans with ``opentelemetry.trace.get_tracer("daskinfer")``, into whatever tracer
provider the application configures (a notebook, ``daskinfer gateway``, or ``dask worker --preload``
on the workers); without a provider the API records nothing, and without the package, or with
``daskinfer.tracing.enabled: false`` (the default), daskinfer does not look for one at all.

Context crosses every hop as a W3C ``traceparent``:

- the client sends the span current at ``submit``/``predict`` with each request (wire field ``tp``);
- the gateway reads a ``traceparent`` HTTP header or gRPC metadata entry and makes a server span;
- a producer in another language sets a ``traceparent`` Kafka header or Redis entry field.

On the worker a span per batch (``daskinfer.batch``) *links* to the context of each of its
requests, as OpenTelemetry models batching (one batch serves many traces); when all of them share
one trace the batch span is also that trace's child, so that trace reads caller -> batch -> stages
-> models -> write.  Children: a span per stage (``daskinfer.stage``), per model call
(``daskinfer.model``) and per write (``daskinfer.write``).  Spans are made per batch, never per
row.  Each answer carries the batch span's trace id back (:attr:`Result.trace_id
<daskinfer.wire.messages.Result.trace_id>`).

Sampling: a batch with a request whose context is sampled is traced (parent based); a batch
without one is traced with probability ``daskinfer.tracing.sample-ratio``; the provider's own
sampler has the last word.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

import dask.config

TRACER_NAME = "daskinfer"
TRACEPARENT = "traceparent"
MAX_LINKS = 128  # OpenTelemetry's default span link limit


class _OTel:
    """The OpenTelemetry API, imported on first use (a process with tracing off never imports it)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.context = context
        self.propagator = TraceContextTextMapPropagator()


@functools.cache
def _otel() -> _OTel:
    return _OTel()


@functools.cache
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (``pip install daskinfer[tracing]``)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:  # no opentelemetry package at all
        return False


def enabled() -> bool:
    """``daskinfer.tracing.enabled`` in this process, and the API installed."""
    return bool(dask.config.get("daskinfer.tracing.enabled", False)) and available()


def sample_ratio() -> float:
    """``daskinfer.tracing.sample-ratio``: the share of batches without a sampled caller that are traced."""
    ratio = float(dask.config.get("daskinfer.tracing.sample-ratio", 1.0))
    if not 0.0 <= ratio <= 1.0:
        from daskinfer.exceptions import ConfigError

        raise ConfigError(f"daskinfer.tracing.sample-ratio must be between 0 and 1, got {ratio}")
    return ratio


def tracer() -> Any:
    """daskinfer's tracer from the global tracer provider."""
    from daskinfer.version import __version__

    return _otel().trace.get_tracer(TRACER_NAME, __version__)


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the span current in this context, or None (no valid span)."""
    span_context = _otel().trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def context_from_traceparent(traceparent: str | None) -> Any:
    """An OpenTelemetry context whose current span is the remote span of ``traceparent`` (None: none
    or not a valid ``traceparent``: a malformed header is ignored, as the W3C specification says)."""
    if not traceparent or not available():
        return None
    ctx = _otel().propagator.extract({TRACEPARENT: traceparent})
    if not _otel().trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def span_context_of(traceparent: str) -> Any:
    """The remote span context of ``traceparent``, or None if it is not valid."""
    ctx = context_from_traceparent(traceparent)
    return None if ctx is None else _otel().trace.get_current_span(ctx).get_span_context()


@contextlib.contextmanager
def server_span(name: str, traceparent: str | None, attributes: dict[str, Any]) -> Iterator[None]:
    """A server span (child of ``traceparent`` when valid), current in the block; nothing when off."""
    if not enabled():
        yield
        return
    with tracer().start_as_current_span(
        name,
        context=context_from_traceparent(traceparent),
        kind=_otel().trace.SpanKind.SERVER,
        attributes=attributes,
    ):
        yield


class BatchTrace:
    """The spans of one batch on a worker: the batch span, current while its stages run, and its
    children.  Made by :meth:`PartitionTracer.begin`; ended by :meth:`end` once written."""

    def __init__(self, span: Any, tracer: Any):
        self.span = span
        self._tracer = tracer
        self._write: Any = None
        span_context = span.get_span_context()
        self.trace_id = f"{span_context.trace_id:032x}" if span_context.is_valid else None

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """The batch span is the current span in the block (the stages' spans become its children)."""
        with _otel().trace.use_span(self.span, end_on_exit=False, record_exception=False):
            yield

    def writing(self) -> None:
        """The answers are handed to the writer: the write span starts."""
        self._write = self._tracer.start_span("daskinfer.write", context=_otel().trace.set_span_in_context(self.span))

    def end(self, error: BaseException | None = None) -> None:
        """Written and committed (or not: ``error``): end the write span and the batch span."""
        for span in (self._write, self.span):
            if span is None:
                continue
            if error is not None:
                span.set_status(
                    _otel().trace.Status(_otel().trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
                )
            span.end()
        self._write = None


class PartitionTracer:
    """Makes the batch spans of one partition.

    Parameters
    ----------
    pipeline : str
        The pipeline's name (span attribute ``daskinfer.pipeline``).
    partition : int
        The inbox partition (``daskinfer.partition``).
    sample_ratio : float
        Share of batches without a sampled request context that are traced.
    """

    def __init__(self, pipeline: str, partition: int, sample_ratio: float):
        self.pipeline = pipeline
        self.partition = partition
        self.sample_ratio = sample_ratio
        self.tracer = tracer()
        self._random = random.Random()

    def begin(self, traceparents: Iterable[str], rows: int, requests: int, queue_wait: float) -> BatchTrace | None:
        """The spans of a batch whose requests carry ``traceparents``; None when it is not traced."""
        links: list[Any] = []
        parents: set[tuple[int, int]] = set()
        sampled = False
        for tp in traceparents:
            span_context = span_context_of(tp)
            if span_context is None:
                continue
            parents.add((span_context.trace_id, span_context.span_id))
            sampled = sampled or span_context.trace_flags.sampled
            if len(links) < MAX_LINKS:
                links.append(_otel().trace.Link(span_context))
        if not sampled and not (self.sample_ratio > 0 and self._random.random() < self.sample_ratio):
            return None
        parent = None
        if len(parents) == 1:  # one caller: the batch is a child in its trace (and linked)
            parent = _otel().trace.set_span_in_context(_otel().trace.NonRecordingSpan(links[0].context))
        span = self.tracer.start_span(
            "daskinfer.batch",
            context=parent if parent is not None else _otel().context.Context(),
            kind=_otel().trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "daskinfer.pipeline": self.pipeline,
                "daskinfer.partition": self.partition,
                "daskinfer.batch.rows": rows,
                "daskinfer.batch.requests": requests,
                "daskinfer.batch.traces": len(parents),
                "daskinfer.queue_wait_s": queue_wait,
            },
            start_time=time.time_ns(),
        )
        return BatchTrace(span, self.tracer)


def stage_span(kind: str, label: str, rows: int) -> Any:
    """A span for one stage (``kind``: infer, map_batches, ...; ``label``: with its name) run on
    ``rows`` rows, child of the current (batch) span."""
    return tracer().start_as_current_span(
        "daskinfer.stage",
        attributes={"daskinfer.stage": kind, "daskinfer.stage.label": label, "daskinfer.batch.rows": rows},
    )


def model_span(model: str, version: str | None, rows: int) -> Any:
    """A span for one model call, child of the current (stage) span."""
    return tracer().start_as_current_span(
        "daskinfer.model",
        attributes={"daskinfer.model": model, "daskinfer.model.version": version or "", "daskinfer.batch.rows": rows},
    )
