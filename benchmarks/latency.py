"""Light-load latency: the native client, the gateway and a FastAPI per-request server, side by side.

The same model (the bundled MLP 16->64->64->2), one row per request, at three light loads:
one request at a time (C=1), and open loops at 200 and 1,000 requests/s (latency from each
request's scheduled time), through

(a) the native client (:class:`~daskinfer.InferenceClient`, sync, in this process) to a
    pipeline on a ``dask scheduler`` and two one-thread ``dask worker`` processes;
(b) ``daskinfer gateway`` (its own process) in front of the same pipeline, v2 REST JSON from a
    load generator in its own process (``_loadgen.py``);
(c) ``fastapi_server.py`` under uvicorn: FastAPI + onnxruntime, one model call per HTTP request.

The floors, measured in the same run: one distributed comm round trip from this process to a
worker (an echo handler: a request and its answer cross two such hops), and one onnxruntime
call on one row.  Everything shares this machine's cores, so read the ratios.  The last line
printed is one JSON object.

    python benchmarks/latency.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import free_port, process_cluster  # noqa: E402
from gateway import ENV, HERE, check_answer, json_bodies, load, started  # noqa: E402
from throughput import bench_latency  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows  # noqa: E402

RATES = (200, 1000)


def _pcts(ms: np.ndarray) -> tuple[float, float]:
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def native_c1(ic: InferenceClient, rows: np.ndarray, n: int) -> tuple[float, float]:
    """p50/p99 ms of ``n`` requests one at a time (each waits for its answer)."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = ic.submit(rows[i % len(rows)]).result(30)
        lat.append(time.perf_counter() - t0)
        assert r.ok, r.error
    return _pcts(np.array(lat) * 1e3)


def comm_floor(client, n: int) -> tuple[float, float]:
    """p50/p99 ms of a bare distributed RPC round trip from this process to a worker (echo)."""

    def install(dask_worker=None):
        async def echo(comm=None, x=None):
            return x

        dask_worker.handlers["daskinfer_bench_echo"] = echo

    client.run(install)
    worker = sorted(client.scheduler_info()["workers"])[0]

    async def pings() -> list[float]:
        from distributed.core import rpc

        out = []
        async with rpc(worker) as r:
            for i in range(n):
                t0 = time.perf_counter()
                await r.daskinfer_bench_echo(x=i)
                out.append(time.perf_counter() - t0)
        return out

    return _pcts(np.array(client.sync(pings)) * 1e3)


def ort_floor(n: int) -> float:
    """Microseconds of one onnxruntime call on one row (one thread)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(bundled_model_path(), sess_options=so, providers=["CPUExecutionProvider"])
    x = random_rows(1, seed=0)
    sess.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, {"x": x})
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def http_loads(url: str, bodies: str, duration: float) -> dict[str, tuple[float, float]]:
    out = {}
    c1 = load(url, bodies, "closed", duration, concurrency=1)
    out["c1"] = (c1["p50_ms"], c1["p99_ms"])
    for rate in RATES:
        r = load(url, bodies, "open", duration, rate=rate)
        out[str(rate)] = (r["p50_ms"], r["p99_ms"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 90 s in all)")
    args = parser.parse_args()
    q = args.quick
    n_c1 = 500 if q else 3000
    duration = 3.0 if q else 10.0
    t_start = time.perf_counter()
    rows = random_rows(2000, seed=5)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = os.path.join(tmp, "single.json")
        with open(bodies, "w") as f:
            json.dump(json_bodies(256), f)
        with process_cluster(n_workers=2) as client:
            deploy(client, OnnxModel("mlp", bundled_model_path()))
            deploy_pipeline(client, Pipeline(model="mlp", inbox="latency-bench", partitions=2))
            figures["comm_rtt_p50_ms"], figures["comm_rtt_p99_ms"] = comm_floor(client, n_c1)
            with InferenceClient(client, inbox="latency-bench") as ic:
                native_c1(ic, rows, 100)  # warm up: comms, routes
                figures["native_c1_p50_ms"], figures["native_c1_p99_ms"] = native_c1(ic, rows, n_c1)
                for rate in RATES:
                    p50, p99, _ = bench_latency(ic, rows, rate, duration)
                    figures[f"native_{rate}_p50_ms"], figures[f"native_{rate}_p99_ms"] = round(p50, 3), round(p99, 3)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            gateway_cmd = [
                sys.executable, "-m", "daskinfer.cli", "gateway", "--scheduler", client.scheduler.address,
                "--pipeline", "mlp=latency-bench", "--http-port", str(port), "--no-grpc", "--log-level", "WARNING",
            ]  # fmt: skip
            with started(gateway_cmd, url):
                infer = f"{url}/v2/models/mlp/infer"
                check_answer(infer, 1)
                for k, (p50, p99) in http_loads(infer, bodies, duration).items():
                    figures[f"gateway_{k}_p50_ms"], figures[f"gateway_{k}_p99_ms"] = p50, p99
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        fastapi_cmd = [
            sys.executable, "-m", "uvicorn", "fastapi_server:app", "--app-dir", HERE, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        with started(fastapi_cmd, url, env=dict(ENV, DASKINFER_BENCH_MODEL=bundled_model_path())):
            infer = f"{url}/v2/models/mlp/infer"
            check_answer(infer, 1)
            for k, (p50, p99) in http_loads(infer, bodies, duration).items():
                figures[f"fastapi_{k}_p50_ms"], figures[f"fastapi_{k}_p99_ms"] = p50, p99
    figures["ort_row_us"] = ort_floor(2000)
    for who in ("native", "gateway"):
        for k in ("c1", *map(str, RATES)):
            figures[f"{who}_{k}_p99_vs_fastapi"] = round(
                figures[f"{who}_{k}_p99_ms"] / figures[f"fastapi_{k}_p99_ms"], 2
            )
    figures["native_c1_p50_over_comm_floor"] = round(figures["native_c1_p50_ms"] / (2 * figures["comm_rtt_p50_ms"]), 2)
    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    print(
        f"native C=1 p50/p99 {figures['native_c1_p50_ms']}/{figures['native_c1_p99_ms']} ms (two comm hops: "
        f"2 x {figures['comm_rtt_p50_ms']} ms p50); 1000 req/s p99 {figures['native_1000_p99_ms']} ms; "
        f"gateway C=1 p99 {figures['gateway_c1_p99_ms']} ms; FastAPI C=1 p50/p99 "
        f"{figures['fastapi_c1_p50_ms']}/{figures['fastapi_c1_p99_ms']} ms; ORT one row {figures['ort_row_us']} us"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
