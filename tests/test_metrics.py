"""Prometheus metrics scraped from real processes: the workers' and the scheduler's ``/metrics``
(Dask's HTTP servers), and a model server's REST port.  The values must move with traffic by
exactly what was sent."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections import defaultdict

import numpy as np
import pytest
from optional import require

require("prometheus_client", "prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import daskinfer  # noqa: E402
from daskinfer import InferenceClient, ModelServer, OnnxModel, Pipeline, RemoteModel, deploy_pipeline  # noqa: E402
from daskinfer.testing import collect_results, random_rows  # noqa: E402


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` of ``url`` as {sample name: [(labels, value)]}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == m for k, m in match.items()))


def worker_metrics_urls(client) -> list[str]:
    urls = []
    for addr, info in client.scheduler_info()["workers"].items():
        host = addr.split("://", 1)[1].rsplit(":", 1)[0]
        urls.append(f"http://{host}:{info['services']['dashboard']}/metrics")
    return urls


def scrape_workers(client) -> dict:
    merged: dict = defaultdict(list)
    for url in worker_metrics_urls(client):
        for name, samples in scrape(url).items():
            merged[name] += samples
    return merged


@pytest.fixture(scope="module")
def metrics_model(client, mlp_path):
    daskinfer.deploy(client, OnnxModel("mlp-metrics", mlp_path))
    yield "mlp-metrics"
    daskinfer.undeploy(client, "mlp-metrics")


def test_worker_and_scheduler_metrics_move_with_traffic(client, metrics_model, poll):
    inbox = f"metrics-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(model=metrics_model, inbox=inbox, partitions=2))
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            ic.submit(random_rows(1)[0]).result()  # the partitions run (and export) before the first scrape
            poll(
                lambda: total(scrape_workers(client), "daskinfer_requests_total", pipeline=handle.name) == 1,
                what="the first request counted",
            )
            before = scrape_workers(client)
            rows = random_rows(300, seed=3)
            for r in rows:
                ic.send(r)
            for i in range(5):  # blocks of 10 rows: 5 requests, 50 rows
                ic.send(random_rows(10, seed=10 + i), batched=True)
            for _ in range(7):  # the wrong dtype: answered with an error
                ic.send({"x": np.zeros(16, np.float64)})
            results = collect_results(ic, 312)
        error_types = {r.error_type for r in results if r.error_type}
        assert sum(1 for r in results if r.error_type) == 7 and len(error_types) == 1
        error_type = error_types.pop()

        def counted() -> float:
            return total(scrape_workers(client), "daskinfer_requests_total", pipeline=handle.name)

        poll(lambda: counted() == 313, what="313 requests counted on the workers")
        after = scrape_workers(client)
        p = {"pipeline": handle.name}
        assert total(after, "daskinfer_requests_total", **p) - total(before, "daskinfer_requests_total", **p) == 312
        assert total(after, "daskinfer_rows_total", **p) - total(before, "daskinfer_rows_total", **p) == 357
        assert total(after, "daskinfer_errors_total", error_type=error_type, **p) == 7
        # every request has a latency and a queue wait; every batch a size and an inference time
        assert total(after, "daskinfer_request_latency_seconds_count", **p) == 313
        assert total(after, "daskinfer_queue_wait_seconds_count", **p) == 313
        batches = total(after, "daskinfer_batches_total", **p)
        assert batches >= 2 and total(after, "daskinfer_batch_rows_count", **p) == batches
        assert total(after, "daskinfer_inference_seconds_count", **p) == batches
        assert total(after, "daskinfer_batch_rows_sum", **p) == 358  # rows of every batch, the first request's too
        inf = [
            v
            for labels, v in after["daskinfer_request_latency_seconds_bucket"]
            if labels["pipeline"] == handle.name and labels["le"] == "+Inf"
        ]
        assert sum(inf) == 313
        assert len(after["daskinfer_partition_up"]) >= 2
        assert total(after, "daskinfer_model_info", model=metrics_model, version="1") == 2  # one per worker

        # the scheduler's /metrics: totals over the pipeline once the controller has polled the runners
        scheduler_url = client.dashboard_link.replace("/status", "/metrics")
        poll(
            lambda: total(scrape(scheduler_url), "daskinfer_pipeline_requests_total", **p) == 313,
            what="the scheduler's totals",
        )
        sched = scrape(scheduler_url)
        assert total(sched, "daskinfer_pipeline_errors_total", **p) == 7
        assert total(sched, "daskinfer_pipeline_partitions_placed", **p) == 2
        assert len([s for s in sched["daskinfer_pipeline_lag"] if s[0]["pipeline"] == handle.name]) == 2
        assert {labels["topic"] for labels, _ in sched["daskinfer_topic_messages"]} >= {"dead-letter"}
    finally:
        handle.stop()


def _post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _v2(x: np.ndarray) -> dict:
    return {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32" if x.dtype == np.float32 else "FP64",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }


def test_model_server_metrics_count_calls_and_errors_by_kind(mlp_path):
    with ModelServer(OnnxModel("mlp", mlp_path), serve_grpc=False, http_port=0) as server:
        url = f"{server.http_url}/v2/models/mlp/infer"
        assert all(_post(url, _v2(random_rows(n, seed=n))) == 200 for n in (1, 2, 3, 4))
        assert _post(url, _v2(random_rows(2, n_in=15))) == 400
        assert _post(url, _v2(random_rows(2).astype(np.float64))) == 400
        m = scrape(f"{server.http_url}/metrics")
        assert total(m, "daskinfer_v2_requests_total", model="mlp") == 6
        assert total(m, "daskinfer_v2_errors_total", model="mlp", kind="BadRequest") == 2
        assert total(m, "daskinfer_v2_rows_total", model="mlp") == 10
        assert total(m, "daskinfer_v2_request_seconds_count", model="mlp") == 6
        assert total(m, "daskinfer_v2_model_info", model="mlp", version="1") == 1
        assert total(m, "daskinfer_v2_ready") == 1
        assert "process_cpu_seconds_total" in m


def test_remote_model_calls_retries_and_breaker_state(client, mlp_path, poll):
    """Calls to a live service count; once it is gone, retries count and the breaker opens."""
    server = ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, serve_http=False).start()
    daskinfer.deploy(
        client,
        RemoteModel(
            "mlp-remote-metrics",
            server.grpc_address,
            remote_name="mlp",
            retries=1,
            backoff_base=0.01,
            breaker_failures=2,
            breaker_reset=60,
            timeout=2,
        ),
    )
    inbox = f"metrics-remote-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(model="mlp-remote-metrics", inbox=inbox, partitions=1))
    labels = {"model": "mlp-remote-metrics"}
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            assert all(r.error_type is None for r in [ic.submit(random_rows(1, seed=i)[0]).result() for i in range(3)])
            m = scrape_workers(client)
            assert total(m, "daskinfer_remote_calls_total", **labels) == 3
            assert total(m, "daskinfer_remote_retries_total", **labels) == 0
            # both workers hold the model, each with its own breaker
            assert total(m, "daskinfer_remote_breaker_state", state="closed", **labels) == 2
            server.stop()
            failed = [ic.submit(random_rows(1, seed=9)[0]).result() for _ in range(3)]
            assert all(r.error_type is not None for r in failed)
        m = scrape_workers(client)
        assert total(m, "daskinfer_remote_retries_total", **labels) >= 1
        # the breaker of the worker that runs the partition is open, the other one's is still closed
        assert total(m, "daskinfer_remote_breaker_state", state="open", **labels) == 1
        assert total(m, "daskinfer_remote_breaker_state", state="closed", **labels) == 1
        assert total(m, "daskinfer_remote_breaker_opened_total", **labels) == 1
        assert total(m, "daskinfer_remote_fast_failures_total", **labels) >= 1
    finally:
        handle.stop()
        server.stop()
        daskinfer.undeploy(client, "mlp-remote-metrics")


def test_gateway_metrics_count_calls_and_errors_by_kind(client, metrics_model):
    from daskinfer.server.gateway import Gateway

    inbox = f"metrics-gw-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(model=metrics_model, inbox=inbox, partitions=1))
    try:
        with Gateway(
            client.scheduler.address, {"mlp": f"{inbox}:{metrics_model}"}, serve_grpc=False, http_port=0
        ) as gw:
            url = f"{gw.http_url}/v2/models/mlp/infer"
            assert all(_post(url, _v2(random_rows(n, seed=n))) == 200 for n in (1, 5, 7))
            assert _post(url, _v2(random_rows(2, n_in=15))) == 400
            m = scrape(f"{gw.http_url}/metrics")
        assert total(m, "daskinfer_v2_requests_total", model="mlp") == 4
        assert total(m, "daskinfer_v2_errors_total", model="mlp", kind="BadRequest") == 1
        assert total(m, "daskinfer_v2_rows_total", model="mlp") == 13
        assert total(m, "daskinfer_v2_request_seconds_count", model="mlp") == 4
    finally:
        handle.stop()
