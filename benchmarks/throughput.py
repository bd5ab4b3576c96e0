"""Throughput and latency of the pipeline, side by side with its limits and with REST.

Measured in one run, on the same model (the bundled MLP 16->64->64->2) and data:

1. raw onnxruntime on the same 4096-row blocks in one process, one thread (the physical limit);
2. end to end through the pipeline with columnar blocks (inferences/s), and the ratio to raw;
3. end to end with single-row requests from ``--producers`` client processes (requests/s, the
   aggregate), and from one client in this process;
4. latency p50/p99 end to end at 10%, 50% and 80% of the peak of (3), measured in each producer
   (an open loop at the same share of the load each);
5. Python CPU per single-row request in the partition runners (worker CPU time during a burst,
   minus the time in the model and minus what the workers burn idle over as long, per request;
   ``worker_us_per_req`` keeps the idle CPU in);
6. a dataflow pipeline (map_batches -> infer -> infer -> map_batches) against the single-model
   pipeline, the same requests in the same run;
7. a REST-per-request server (aiohttp + onnxruntime, one request per HTTP call, 64 concurrent
   clients on loopback), and the ratio of (3) to it;
8. tracing (daskinfer.tracing): blocks through pipelines deployed with tracing off, on with
   sample-ratio 0 (``tracing_on_vs_off``) and on with sample-ratio 1, every batch's spans recorded
   by the OpenTelemetry SDK on the workers (``tracing_sampled_vs_off``), in alternating rounds.

The cluster is a `dask scheduler` process and two one-thread `dask worker` processes, as in a
deployment; requests go straight from the clients to the workers.  Everything shares this
machine's cores, so read the ratios, not the absolute figures.  The last line is one JSON object.

    python benchmarks/throughput.py --quick [--producers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import dask
import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import free_port, process_cluster  # noqa: E402
from _load import run_producers  # noqa: E402

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


def bench_tracing(client: Any, block: np.ndarray, n_blocks: int, rounds: int) -> tuple[float, float]:
    """Blocks with tracing off, on (sample-ratio 0) and sampled (ratio 1), in alternating rounds,
    the best round of each; returns (on / off, sampled / off)."""
    modes = {"off": {"daskinfer.tracing.enabled": False}}
    modes["on"] = {"daskinfer.tracing.enabled": True, "daskinfer.tracing.sample-ratio": 0.0}
    modes["sampled"] = {"daskinfer.tracing.enabled": True, "daskinfer.tracing.sample-ratio": 1.0}
    best = dict.fromkeys(modes, 0.0)
    handles, clients = [], {}
    try:
        for mode, cfg in modes.items():
            with dask.config.set(cfg):
                handles.append(
                    deploy_pipeline(client, Pipeline(model="mlp", inbox=f"bench-trace-{mode}", partitions=2))
                )
                clients[mode] = InferenceClient(client, inbox=f"bench-trace-{mode}")
        for ic in clients.values():
            bench_blocks(ic, block, 10)  # warm up
        for _ in range(rounds):
            for mode, ic in clients.items():
                best[mode] = max(best[mode], bench_blocks(ic, block, n_blocks))
    finally:
        for ic in clients.values():
            ic.close()
        for h in handles:
            h.stop()
    return best["on"] / best["off"], best["sampled"] / best["off"]


def bench_single(ic: InferenceClient, rows: np.ndarray) -> tuple[float, float, float]:
    """Single-row requests from this process: requests/s, the mean batch, and this process's CPU
    per request in microseconds (every thread: the caller's and the client's event loop)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    futures = [ic.submit(r) for r in rows]
    results = [f.result(120) for f in futures]
    rate = len(rows) / (time.perf_counter() - t0)
    cpu_us = (time.process_time() - cpu0) / len(rows) * 1e6
    assert all(r.ok for r in results)
    return rate, float(np.mean([r.timings["batch"] for r in results])), cpu_us


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
    lat = np.array([r.latency for r in results]) * 1e3
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
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "rest_server.py"),
            "--port",
            str(port),
            "--model",
            bundled_model_path(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return asyncio.run(_rest_load(port, rows, seconds, concurrency))
    finally:
        server.terminate()
        server.wait(10)


def _worker_cpu(dask_worker=None) -> float:  # runs on each worker: its process CPU seconds
    return time.process_time()


def _model_seconds(handle) -> float:
    return sum(r.get("busy", 0.0) for r in handle.status()["runners"])


def runner_us_per_request(client, handle, ic: InferenceClient, rows: np.ndarray) -> tuple[float, float]:
    """Worker CPU per single-row request besides the model (measured, not estimated).

    Returns ``(runner, worker)``: ``worker`` is all the workers' process CPU during the run, less
    the time in the model, per request; ``runner`` is that less what the same workers burn while
    idle (Dask's own heartbeats and monitors, measured just before for the same length of time).
    """

    def worker_cpu() -> float:
        return sum(client.run(_worker_cpu).values())

    t0, cpu0, busy0 = time.perf_counter(), worker_cpu(), _model_seconds(handle)
    bench_single(ic, rows)
    t1, cpu1, busy1 = time.perf_counter(), worker_cpu(), _model_seconds(handle)
    idle0 = worker_cpu()
    time.sleep(t1 - t0)
    idle_rate = (worker_cpu() - idle0) / (t1 - t0)
    worker = (cpu1 - cpu0) - (busy1 - busy0)
    runner = worker - idle_rate * (t1 - t0)
    return runner / len(rows) * 1e6, worker / len(rows) * 1e6


def _pre(cols):
    return {"x": cols["x"] * 0.5}


def _post(cols):
    return {"label": cols["probabilities"].argmax(axis=1), "p": cols["probabilities"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    parser.add_argument("--producers", type=int, default=2, help="client processes sending single requests")
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

    preload = ["--preload", os.path.join(os.path.dirname(__file__), "_tracing_preload.py")]
    with process_cluster(n_workers=2, worker_args=[preload, preload]) as client:
        address = client.scheduler.address
        deploy(client, OnnxModel("mlp", bundled_model_path()))
        deploy(client, OnnxModel("mlp-b", bundled_model_path()))
        handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="bench", partitions=2))
        flow = (
            Pipeline(inbox="bench-flow", partitions=2).map_batches(_pre).infer("mlp").infer("mlp-b").map_batches(_post)
        )
        flow_handle = deploy_pipeline(client, flow)
        with InferenceClient(client, inbox="bench") as ic, InferenceClient(client, inbox="bench-flow") as fc:
            bench_single(ic, rows[:2000])  # warm up
            bench_single(fc, rows[:2000])
            blocks = bench_blocks(ic, block, n_blocks)
            print(f"pipeline, columnar blocks of {BLOCK}: {blocks:,.0f} inferences/s ({blocks / raw:.2f}x raw)")
            in_process, mean_batch, client_us = max(bench_single(ic, rows) for _ in range(2 if q else 3))
            print(
                f"pipeline, single-row requests from one client in this process: {in_process:,.0f} requests/s "
                f"(mean batch {mean_batch:.0f} rows; {client_us:.1f} us of this process's CPU per request)"
            )
            flow_rate = max(bench_single(fc, rows)[0] for _ in range(2 if q else 3))
            print(
                f"dataflow pipeline (map_batches -> infer -> infer -> map_batches): {flow_rate:,.0f} requests/s, "
                f"{flow_rate / in_process:.2f}x the single-model pipeline"
            )
            runner_us, worker_us = runner_us_per_request(client, handle, ic, rows)
            print(
                f"partition runners: {runner_us:.1f} us of worker CPU per single-row request besides the model "
                f"and the workers' idle CPU ({worker_us:.1f} us with it)"
            )
        tracing_on, tracing_sampled = bench_tracing(client, block, n_blocks // 3, 3 if q else 5)
        print(
            f"tracing, columnar blocks: on (sample-ratio 0) {tracing_on:.3f}x off, every batch traced "
            f"{tracing_sampled:.3f}x off"
        )
        burst = run_producers(address, "bench", args.producers, mode="burst", n=n_single // args.producers)
        single = burst["requests_s"]
        print(
            f"pipeline, single-row requests from {args.producers} producer processes: {single:,.0f} requests/s "
            f"(mean batch {burst['batch']:.0f} rows)"
        )
        lat = {}
        for pct in (10, 50, 80):
            r = run_producers(
                address,
                "bench",
                args.producers,
                mode="open",
                rate=single * pct / 100 / args.producers,
                seconds=lat_seconds,
            )
            lat[pct] = (r["p50_ms"], r["p99_ms"], r["p99_ms_each"])
            print(
                f"latency at {pct}% load ({r['requests_s']:,.0f} req/s): p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms (p99 in each producer: {r['p99_ms_each']})"
            )
        handle.stop()
        flow_handle.stop()

    rest = bench_rest(rows, 3.0 if q else 8.0)
    print(
        f"REST per request (aiohttp + onnxruntime, 64 concurrent clients): {rest:,.0f} requests/s; "
        f"pipeline single-request throughput is {single / rest:.1f}x"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
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
                "producers": args.producers,
                "single_req_s_in_process": round(in_process),
                "p99_ms_80pct_each_producer": lat[80][2],
                "runner_us_per_req": round(runner_us, 2),
                "worker_us_per_req": round(worker_us, 2),
                "dataflow_vs_single": round(flow_rate / in_process, 3),
                "client_us_per_req": round(client_us, 2),
                "tracing_on_vs_off": round(tracing_on, 3),
                "tracing_sampled_vs_off": round(tracing_sampled, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
