"""OpenTelemetry tracing (daskinfer/tracing.py) on a real cluster, read with the SDK's in-memory exporter.

The cluster's workers run in this process (``processes=False``) so that their spans reach the
exporter the test sets up; a deployment would set the exporter up in a ``dask worker --preload``
(README, "Tracing").  Every answer is also checked against the model run directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid

import dask
import grpc
import numpy as np
import pytest
from distributed import Client, LocalCluster
from kafka_broker import kafka_bootstrap, kafka_broker  # noqa: F401  (fixtures: a real Kafka broker on loopback)
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures: a real redis-server on loopback)

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.dataflow.nodes import message_traceparent
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.gateway import Gateway
from daskinfer.testing import random_rows, run_onnx_directly
from daskinfer.tracing import context_from_traceparent
from daskinfer.wire.messages import Request, decode_result

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

EXPORTER = InMemorySpanExporter()


def double(cols):
    """The first stage of the two-stage pipeline: x * 2 (module level, so workers can import it)."""
    return {"x": (cols["x"] * 2).astype(np.float32)}


@pytest.fixture(scope="module")
def provider():
    """The SDK's tracer provider with the in-memory exporter, as the process's global provider."""
    current = otel_trace.get_tracer_provider()
    if not isinstance(current, sdk_trace.TracerProvider):
        current = sdk_trace.TracerProvider()
        otel_trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(EXPORTER))
    return current


@pytest.fixture(scope="module")
def traced_client(provider, mlp_path):
    """An in-process cluster (its workers' spans reach this process's exporter), tracing on, the MLP deployed."""
    with dask.config.set({"daskinfer.tracing.enabled": True, "daskinfer.tracing.sample-ratio": 1.0}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                deploy(client, OnnxModel("mlp", mlp_path))
                yield client


@pytest.fixture
def spans():
    EXPORTER.clear()
    return EXPORTER


def _pipeline(client, **kw):
    inbox = f"traced-{uuid.uuid4().hex[:6]}"
    return inbox, deploy_pipeline(client, Pipeline(inbox=inbox, partitions=1, **kw).map_batches(double).infer("mlp"))


def _named(exporter, name):
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _written(exporter, n, poll):
    """The batch spans, once ``n`` batches were written (a batch span ends after its write commits)."""
    poll(lambda: len(_named(exporter, "daskinfer.batch")) >= n, timeout=30, what=f"{n} ended batch spans")
    return _named(exporter, "daskinfer.batch")


def _children(exporter, parent, name):
    return [s for s in _named(exporter, name) if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_one_request_is_one_trace_from_the_callers_span_to_the_model_call(traced_client, mlp_path, spans, poll):
    inbox, handle = _pipeline(traced_client)
    tracer = otel_trace.get_tracer("test")
    row = random_rows(1, seed=1)[0]
    try:
        with InferenceClient(traced_client, inbox=inbox) as ic:
            with tracer.start_as_current_span("caller") as caller:
                result = ic.submit(row).result(30)
        (batch,) = _written(spans, 1, poll)
    finally:
        handle.stop()
    expected = run_onnx_directly(mlp_path, {"x": double({"x": row[None]})["x"]})["probabilities"][0]
    np.testing.assert_allclose(result.value(), expected, rtol=1e-5, atol=1e-6)
    trace_id = caller.get_span_context().trace_id
    assert result.trace_id == f"{trace_id:032x}", "the answer carries its trace id back"
    assert batch.context.trace_id == trace_id and batch.parent.span_id == caller.get_span_context().span_id
    assert [link.context.span_id for link in batch.links] == [caller.get_span_context().span_id]
    attrs = batch.attributes
    assert (attrs["daskinfer.pipeline"], attrs["daskinfer.partition"], attrs["daskinfer.batch.rows"]) == (inbox, 0, 1)
    assert attrs["daskinfer.queue_wait_s"] >= 0
    stages = _children(spans, batch, "daskinfer.stage")
    assert [s.attributes["daskinfer.stage"] for s in sorted(stages, key=lambda s: s.start_time)] == [
        "map_batches",
        "infer",
    ]
    infer_stage = next(s for s in stages if s.attributes["daskinfer.stage"] == "infer")
    (model,) = _children(spans, infer_stage, "daskinfer.model")
    assert (model.attributes["daskinfer.model"], model.attributes["daskinfer.batch.rows"]) == ("mlp", 1)
    (write,) = _children(spans, batch, "daskinfer.write")
    assert batch.start_time <= stages[0].start_time and model.end_time <= write.end_time <= batch.end_time


def test_a_batch_of_many_callers_links_to_each_of_their_traces(traced_client, mlp_path, spans, poll):
    inbox, handle = _pipeline(traced_client, max_batch_size=64)  # links: at most 128 a batch
    tracer = otel_trace.get_tracer("test")
    rows = random_rows(200, seed=2)
    callers = {}
    try:
        with InferenceClient(traced_client, inbox=inbox) as ic:
            futures = {}
            for i in range(len(rows)):
                with tracer.start_as_current_span(f"caller-{i}") as span:
                    futures[i] = ic.submit(rows[i], request_id=f"r{i}")
                callers[i] = span.get_span_context()
            results = {i: f.result(30) for i, f in futures.items()}
        batches = _written(spans, len({r.trace_id for r in results.values()}), poll)
    finally:
        handle.stop()
    want = run_onnx_directly(mlp_path, {"x": double({"x": rows})["x"]})["probabilities"]
    np.testing.assert_allclose(np.stack([results[i].value() for i in range(len(rows))]), want, rtol=1e-5, atol=1e-6)
    by_trace = {b.context.trace_id: b for b in batches}
    for i, ctx in callers.items():
        batch = by_trace[int(results[i].trace_id, 16)]  # the trace its answer names is its batch's
        assert ctx.span_id in {link.context.span_id for link in batch.links}, f"request {i}'s batch links to it"
    shared = [b for b in batches if len(b.links) > 1]
    assert shared, "200 requests sent at once share batches"
    for b in shared:  # a batch of several callers is a trace of its own, linked from theirs: one link each
        assert b.parent is None and len(b.links) == b.attributes["daskinfer.batch.requests"]


def test_sample_ratio_zero_traces_only_requests_that_come_with_a_sampled_context(traced_client, spans, poll):
    with dask.config.set({"daskinfer.tracing.sample-ratio": 0.0}):
        inbox, handle = _pipeline(traced_client)
    tracer = otel_trace.get_tracer("test")
    row = random_rows(1, seed=3)[0]
    try:
        with InferenceClient(traced_client, inbox=inbox) as ic:
            untraced = [ic.submit(row).result(30) for _ in range(5)]
            with tracer.start_as_current_span("caller") as caller:
                traced = ic.submit(row).result(30)
        (batch,) = _written(spans, 1, poll)
    finally:
        handle.stop()
    assert all(r.ok and r.trace_id is None for r in untraced)
    assert batch.context.trace_id == caller.get_span_context().trace_id == int(traced.trace_id, 16)


def test_tracing_off_makes_no_span_and_sends_no_context(traced_client, spans):
    with dask.config.set({"daskinfer.tracing.enabled": False}):
        inbox, handle = _pipeline(traced_client)
        try:
            with InferenceClient(traced_client, inbox=inbox) as ic:
                with otel_trace.get_tracer("test").start_as_current_span("caller"):
                    result = ic.submit(random_rows(1, seed=4)[0]).result(30)
        finally:
            handle.stop()
    assert result.ok and result.trace_id is None
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("daskinfer.")]


def test_the_gateway_continues_the_traceparent_of_rest_grpc_and_stream_callers(traced_client, mlp_path, spans, poll):
    inbox, handle = _pipeline(traced_client)
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    traceparent = f"00-{trace_id}-{span_id}-01"
    x = random_rows(3, seed=5)
    want = run_onnx_directly(mlp_path, {"x": double({"x": x})["x"]})["probabilities"]
    try:
        with Gateway(traced_client.cluster, {"m": f"{inbox}:mlp"}, grpc_port=0, http_port=0) as gw:
            body = {"inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
            req = urllib.request.Request(
                f"{gw.http_url}/v2/models/m/infer",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "traceparent": traceparent},
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                rest = json.loads(r.read())
            with grpc.insecure_channel(gw.grpc_address.removeprefix("grpc://")) as ch:
                call = pb.ModelInferRequest(model_name="m")
                call.inputs.add(name="x", datatype="FP32", shape=[3, 16])
                call.raw_input_contents.append(x.tobytes())
                reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    call, metadata=(("traceparent", traceparent),), timeout=30
                )
                # a ModelStreamInfer stream's traceparent is the parent of each of its requests
                (streamed,) = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(
                    iter([call]), metadata=(("traceparent", traceparent),), timeout=30
                )
        batches = _written(spans, 3, poll)
    finally:
        handle.stop()
    np.testing.assert_allclose(np.asarray(rest["outputs"][0]["data"]).reshape(3, 2), want, rtol=1e-5, atol=1e-6)
    for answer in (reply, streamed.infer_response):
        np.testing.assert_allclose(
            np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 2), want, rtol=1e-5, atol=1e-6
        )
    servers = _named(spans, "daskinfer.infer")
    assert len(servers) == 3
    for server in servers:  # the gateway's span is the caller's child, and the batch is the gateway span's
        assert (server.context.trace_id, server.parent.span_id) == (int(trace_id, 16), int(span_id, 16))
        assert server.kind == otel_trace.SpanKind.SERVER
        (batch,) = [b for b in batches if b.parent is not None and b.parent.span_id == server.context.span_id]
        stages = _children(spans, batch, "daskinfer.stage")  # the two-stage pipeline, then its model call
        assert sorted(s.attributes["daskinfer.stage"] for s in stages) == ["infer", "map_batches"]
        (infer,) = [s for s in stages if s.attributes["daskinfer.stage"] == "infer"]
        (model,) = _children(spans, infer, "daskinfer.model")
        assert (model.attributes["daskinfer.model"], model.attributes["daskinfer.batch.rows"]) == ("mlp", 3)


def test_a_producer_sets_traceparent_as_a_redis_field(traced_client, mlp_path, spans, poll, redis_url):
    """A producer in another language sends its context as a ``traceparent`` entry field; a
    malformed one is ignored and its request answered like any other."""
    redis = pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    inbox, handle = _pipeline(traced_client, connector="redis", connector_options={"url": redis_url})
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    rows = random_rows(2, seed=6)
    reply = f"daskinfer-replies-{uuid.uuid4().hex[:8]}"
    try:
        with redis.Redis.from_url(redis_url) as r:
            r.xadd(reply, {"d": b""}, maxlen=0)  # it must exist before results come
            good = Request("good", {"x": rows[0]}, reply_to=reply).encode()
            r.xadd(f"{inbox}:0", {"d": good, "traceparent": f"00-{trace_id}-{span_id}-01"})
            bad = Request("bad", {"x": rows[1]}, reply_to=reply, traceparent="garbage").encode()
            r.xadd(f"{inbox}:0", {"d": bad, "traceparent": "00-not-a-trace-context"})
            poll(lambda: r.xlen(reply) >= 2, timeout=30, what="2 results on the reply stream")
            results = {res.id: res for res in (decode_result(f[b"d"]) for _, f in r.xrange(reply))}
        batches = _written(spans, 1, poll)
    finally:
        handle.stop()
    want = run_onnx_directly(mlp_path, {"x": double({"x": rows})["x"]})["probabilities"]
    np.testing.assert_allclose(results["good"].value(), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["bad"].value(), want[1], rtol=1e-5, atol=1e-6)
    traced = [b for b in batches if b.context.trace_id == int(trace_id, 16)]
    assert len(traced) == 1 and traced[0].parent.span_id == int(span_id, 16)
    assert results["good"].trace_id == trace_id
    (model,) = [s for s in _named(spans, "daskinfer.model") if s.context.trace_id == int(trace_id, 16)]
    assert model.attributes["daskinfer.model"] == "mlp"
    assert all(len(b.links) <= 1 for b in batches), "the malformed context is no link"


def test_trace_contexts_are_read_from_the_request_or_the_message_headers():
    assert context_from_traceparent("00-not-a-trace-context") is None
    assert context_from_traceparent(None) is None
    tp = f"00-{'ab' * 16}-{'cd' * 8}-01"
    assert context_from_traceparent(tp) is not None
    assert message_traceparent({"traceparent": tp.encode()}) == tp  # a Kafka header's bytes
    assert message_traceparent({"content-type": "application/json"}) is None
    assert message_traceparent(None) is None


def _provider_kind() -> str:
    from opentelemetry import trace

    return type(trace.get_tracer_provider()).__module__


def test_the_readme_preload_sets_the_sdk_up_on_a_worker():
    """conf/tracing_preload.py as a worker preload (what ``dask worker --preload`` runs): the worker's
    global provider is the SDK's, with the OTLP exporter where installed, else the console's."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "conf", "tracing_preload.py")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", preload=[path]) as c:
        with Client(c) as client:
            (kind,) = client.run(_provider_kind).values()
    assert kind.startswith("opentelemetry.sdk.trace"), kind


def test_a_producer_sets_traceparent_as_a_kafka_header(traced_client, mlp_path, spans, poll, kafka_bootstrap):
    from confluent_kafka import Consumer, Producer, TopicPartition

    outbox = f"traced-out-{uuid.uuid4().hex[:6]}"
    inbox, handle = _pipeline(
        traced_client, connector="kafka", connector_options={"bootstrap_servers": kafka_bootstrap}, outbox=outbox
    )
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    row = random_rows(1, seed=8)[0]
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"look-{uuid.uuid4().hex[:6]}"})
    try:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        header = f"00-{trace_id}-{span_id}-01"
        producer.produce(inbox, Request("k1", {"x": row}).encode(), partition=0, headers=[("traceparent", header)])
        producer.flush(30)
        parts = consumer.list_topics(outbox, timeout=10).topics[outbox].partitions
        consumer.assign([TopicPartition(outbox, p, 0) for p in parts])
        got = []
        poll(
            lambda: got.extend(m.value() for m in consumer.consume(10, 0.2) if m.error() is None) or got,
            timeout=60,
            what="the answer on the outbox",
        )
        batches = _written(spans, 1, poll)
    finally:
        consumer.close()
        handle.stop()
    (result,) = [decode_result(v) for v in got]
    want = run_onnx_directly(mlp_path, {"x": double({"x": row[None]})["x"]})["probabilities"][0]
    np.testing.assert_allclose(result.value(), want, rtol=1e-5, atol=1e-6)
    (batch,) = [b for b in batches if b.context.trace_id == int(trace_id, 16)]
    assert batch.parent.span_id == int(span_id, 16) and result.trace_id == trace_id


def test_with_tracing_off_opentelemetry_is_not_even_imported(client, mlp_deployed):
    """Tracing off (the default) costs nothing: a client that deploys and answers never imports the API."""
    code = (
        "import sys, numpy as np\n"
        "from distributed import Client\n"
        "from daskinfer import InferenceClient, Pipeline, deploy_pipeline\n"
        f"c = Client({client.scheduler.address!r})\n"
        "h = deploy_pipeline(c, Pipeline(model='mlp', inbox='untraced-probe', partitions=1))\n"
        "with InferenceClient(c, inbox='untraced-probe') as ic:\n"
        "    assert ic.submit(np.zeros(16, np.float32)).result(60).ok\n"
        "h.stop()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
