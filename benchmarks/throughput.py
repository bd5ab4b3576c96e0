"""Throughput and latency of the pipeline, side by side with its limits and with REST.

Measured in one run, on the same model (the bundled MLP 16->64->64->2) and data:

1. raw onnxruntime on the same 4096-row blocks in one process, one thread (the physical limit);
2. end to end through the pipeline with columnar blocks (inferences/s), and the ratio to raw;
3. end to end with one request per message (requests/s);
4. latency p50/p99 end to end at 10%, 50% and 80% of the peak single-request rate of (3);
5. a REST-per-request server (aiohttp + onnxruntime, one request per HTTP call, 64 concurrent
   clients on loopback), and the ratio of (3) to it.

The cluster is a `dask scheduler` process and two one-thread `dask worker` processes, as in a
deployment; the client runs in this process.  Everything shares this machine's cores, so read
the ratios, not the absolute figures.  The last line printed is one JSON object.

    python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import free_port, process_cluster  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows  # noqa: E402

BLOCK = 4096


def bench_raw(block: np.ndarray, seconds: float) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(bundled_model_path(), sess_options=so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": block})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"x": block})
        n += 1
    return n * len(block) / (time.perf_counter() - t0)


def bench_blocks(ic: InferenceClient, block: np.ndarray, n_blocks: int) -> float:
    t0 = time.perf_counter()
    futures = [ic.submit_many(block) for _ in range(n_blocks)]
    for f in futures:
        assert f.result(120).ok
    return n_blocks * len(block) / (time.perf_counter() - t0)


def bench_single(ic: InferenceClient, rows: np.ndarray) -> tuple[float, float]:
    t0 = time.perf_counter()
    futures = [ic.submit(r) for r in rows]
    results = [f.result(120) for f in futures]
    rate = len(rows) / (time.perf_counter() - t0)
    assert all(r.ok for r in results)
    return rate, float(np.mean([r.timings["batch"] for r in results]))


def bench_latency(ic: InferenceClient, rows: np.ndarray, rate: float, seconds: float) -> tuple[float, float, float]:
    """Open loop: send at ``rate`` requests/s for ``seconds``; latency of each request."""
    futures = []
    t0 = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - sent
        for _ in range(due):
            futures.append(ic.submit(rows[sent % len(rows)]))
            sent += 1
        time.sleep(0.0005)
    results = [f.result(120) for f in futures]
    lat = np.array([r.timings["latency"] for r in results]) * 1e3
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), sent / seconds


async def _rest_load(port: int, rows: np.ndarray, seconds: float, concurrency: int) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{port}/predict"
    bodies = [{"x": r.tolist()} for r in rows[:1000]]
    count = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for _ in range(50):  # wait for the server
            try:
                async with session.post(url, json=bodies[0]) as resp:
                    await resp.json()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        end = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal count
            while time.perf_counter() < end:
                async with session.post(url, json=bodies[(count + i) % len(bodies)]) as resp:
                    out = await resp.json()
                    assert len(out["probabilities"]) == 2
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return count / (time.perf_counter() - t0)


def bench_rest(rows: np.ndarray, seconds: float, concurrency: int = 64) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "rest_server.py"), "--port", str(port),
         "--model", bundled_model_path()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        return asyncio.run(_rest_load(port, rows, seconds, concurrency))
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    args = parser.parse_args()
    q = args.quick
    n_single = 30_000 if q else 100_000
    n_blocks = 150 if q else 500
    lat_seconds = 3.0 if q else 8.0
    t_start = time.perf_counter()

    block = random_rows(BLOCK, seed=1)
    rows = random_rows(n_single, seed=2)
    raw = bench_raw(block, 2.0 if q else 5.0)
    print(f"raw onnxruntime, 1 process x 1 thread, blocks of {BLOCK}: {raw:,.0f} rows/s")

    with process_cluster(n_workers=2) as client:
        deploy(client, OnnxModel("mlp", bundled_model_path()))
        handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="bench", partitions=2))
        with InferenceClient(client, inbox="bench") as ic:
            bench_single(ic, rows[:2000])  # warm up
            blocks = bench_blocks(ic, block, n_blocks)
            print(f"pipeline, columnar blocks of {BLOCK}: {blocks:,.0f} inferences/s ({blocks / raw:.2f}x raw)")
            single, mean_batch = max(bench_single(ic, rows) for _ in range(2 if q else 3))
            print(f"pipeline, one request per message: {single:,.0f} requests/s (mean batch {mean_batch:.0f} rows)")
            lat = {}
            for pct in (10, 50, 80):
                p50, p99, achieved = bench_latency(ic, rows, single * pct / 100, lat_seconds)
                lat[pct] = (p50, p99)
                print(f"latency at {pct}% load ({achieved:,.0f} req/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        handle.stop()

    rest = bench_rest(rows, 3.0 if q else 8.0)
    print(f"REST per request (aiohttp + onnxruntime, 64 concurrent clients): {rest:,.0f} requests/s; "
          f"pipeline single-request throughput is {single / rest:.1f}x")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(json.dumps({
        "raw_ort_rows_s": round(raw),
        "e2e_block_rows_s": round(blocks),
        "ratio_vs_raw": round(blocks / raw, 3),
        "e2e_single_req_s": round(single),
        "p50_ms_10pct": round(lat[10][0], 2),
        "p99_ms_10pct": round(lat[10][1], 2),
        "p99_ms_50pct": round(lat[50][1], 2),
        "p99_ms_80pct": round(lat[80][1], 2),
        "rest_req_s": round(rest),
        "ratio_vs_rest": round(single / rest, 2),
    }))


if __name__ == "__main__":
    main()
