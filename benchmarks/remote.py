"""Remote models: one unary gRPC call per request vs the pipeline's batched remote operator.

The same model (the bundled MLP 16->64->64->2) runs behind the daskinfer model server
(``daskinfer serve``, its own process, KServe v2 gRPC on loopback), and the same
requests (one row each) arrive one per message, served

(a) by a client making one unary ``ModelInfer`` call per request: the best of sequential
    calls and of 64 calls in flight (``grpc.aio``, in this process);
(b) through the pipeline (inbox -> smart batching -> ``RemoteModel`` -> outbox): the
    partition runners batch the requests and call the server with up to 1024 rows per
    call, a few calls in flight;
(c) through the same pipeline with the model in-process (``OnnxModel`` on the workers).

``overlap_gain``: a remote model with 20 ms of service time (``benchmarks/_latency_model.py``,
served with 8 instances) behind one partition of 32-row batches, ``max_inflight=4`` against
``max_inflight=1``: the partition keeps reading while calls are in flight, so four calls overlap.

(b) and (c) use the partitioned pipeline of :mod:`daskinfer.dataflow.pipeline` and its
:class:`~daskinfer.InferenceClient` (one message per request), on a ``dask scheduler``
and one-thread ``dask worker`` processes, as in a deployment.  Everything shares this
machine's cores (the model server too), so read the ratios, measured side by side in one
run, rather than the absolute figures.  The last line printed is one JSON object.

    python benchmarks/remote.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import free_port, process_cluster  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, RemoteModel, deploy, deploy_pipeline  # noqa: E402
from daskinfer.remote.kserve_grpc import encode_request  # noqa: E402
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly  # noqa: E402

REMOTE_BATCH = 1024  # rows per remote call (b)


OVERLAP_BATCH = 32  # rows per batch of the overlap runs: 32 rows / 20 ms = 1,600 req/s per call in flight


def start_model_server(port: int, models: list[str] | None = None) -> subprocess.Popen:
    """``daskinfer serve`` in its own process (``models``: its model arguments); returns once it serves."""
    cmd = [
        sys.executable,
        "-m",
        "daskinfer.cli",
        "serve",
        *(models or ["--onnx", f"mlp={bundled_model_path()}"]),
        "--grpc-port",
        str(port),
        "--no-http",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        cwd=os.path.dirname(os.path.abspath(__file__)),  # where _latency_model.py is
    )

    async def ready() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=pb.ServerReadyRequest.SerializeToString,
                response_deserializer=pb.ServerReadyResponse.FromString,
            )
            end = time.monotonic() + 60
            while True:
                try:
                    if (await call(pb.ServerReadyRequest(), timeout=1)).ready:
                        return
                except grpc.RpcError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"daskinfer serve exited: {proc.stderr.read()[-2000:]}")
                if time.monotonic() > end:
                    raise RuntimeError("daskinfer serve did not become ready in 60 s")
                await asyncio.sleep(0.05)

    asyncio.run(ready())
    return proc


async def _unary(port: int, rows: np.ndarray, seconds: float, concurrency: int) -> float:
    """Requests/s of one ``ModelInfer`` call per row, ``concurrency`` calls in flight."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        await call(encode_request({"x": rows[:1]}, "mlp", ""))  # connect
        done = 0
        t0 = time.perf_counter()
        end = t0 + seconds

        async def client(i: int) -> None:
            nonlocal done
            j = i
            while time.perf_counter() < end:
                resp = await call(encode_request({"x": rows[j % len(rows) : j % len(rows) + 1]}, "mlp", ""))
                assert np.frombuffer(resp.raw_output_contents[0], "<f4").shape == (2,)
                done += 1
                j += concurrency

        await asyncio.gather(*[client(i) for i in range(concurrency)])
        return done / (time.perf_counter() - t0)


def bench_unary(port: int, rows: np.ndarray, seconds: float) -> tuple[float, float]:
    seq = asyncio.run(_unary(port, rows, seconds, 1))
    conc = asyncio.run(_unary(port, rows, seconds, 64))
    return seq, conc


def bench_pipeline(ic: InferenceClient, rows: np.ndarray) -> tuple[float, float, list]:
    """Requests/s of ``len(rows)`` one-row requests through a pipeline; also the mean batch."""
    t0 = time.perf_counter()
    futures = [ic.submit(r) for r in rows]
    results = [f.result(120) for f in futures]
    rate = len(rows) / (time.perf_counter() - t0)
    bad = [r for r in results if not r.ok]
    assert not bad, f"{len(bad)} errors, e.g. {bad[0].error_type}: {bad[0].error}"
    return rate, float(np.mean([r.timings.get("batch", 1) for r in results])), results


def bench_overlap(client, port: int, n: int) -> dict[int, float]:
    """Requests/s of ``n`` one-row requests through one partition calling the 20 ms service, by max_inflight."""
    deploy(
        client,
        RemoteModel(
            "slow-remote", f"127.0.0.1:{port}", remote_name="slow", max_batch_size=OVERLAP_BATCH, max_inflight=8
        ),
    )
    rows = np.ones((n, 4), np.float32)
    rates: dict[int, float] = {}
    for inflight in (1, 4):
        inbox = f"bench-overlap-{inflight}"
        pipe = Pipeline(
            model="slow-remote", inbox=inbox, partitions=1, max_inflight=inflight, max_batch_size=OVERLAP_BATCH
        )
        handle = deploy_pipeline(client, pipe)
        try:
            with InferenceClient(client, inbox=inbox) as ic:
                bench_pipeline(ic, rows[:200])  # warm up
                rate, _, results = bench_pipeline(ic, rows)
                np.testing.assert_array_equal(results[-1].value(), rows[-1] * 2)
                rates[inflight] = rate
        finally:
            handle.stop()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    args = parser.parse_args()
    q = args.quick
    n_req = 30_000 if q else 100_000
    unary_seconds = 3.0 if q else 8.0
    rounds = 3
    t_start = time.perf_counter()
    rows = random_rows(n_req, seed=2)
    want = run_onnx_directly(bundled_model_path(), {"x": rows})["probabilities"]

    port = free_port()
    server = start_model_server(port)
    try:
        seq, conc = bench_unary(port, rows, unary_seconds)
        unary = max(seq, conc)
        print(f"(a) one unary gRPC call per request: {seq:,.0f} req/s sequential, {conc:,.0f} req/s with 64 in flight")

        with process_cluster(n_workers=2) as client:
            deploy(client, OnnxModel("mlp", bundled_model_path()))
            deploy(
                client,
                RemoteModel(
                    "mlp-remote", f"127.0.0.1:{port}", remote_name="mlp", max_batch_size=REMOTE_BATCH, max_inflight=4
                ),
            )
            pipes = {
                "remote": deploy_pipeline(client, Pipeline(model="mlp-remote", inbox="bench-remote", partitions=2)),
                "inproc": deploy_pipeline(client, Pipeline(model="mlp", inbox="bench-inproc", partitions=2)),
            }
            best: dict[str, tuple[float, float]] = {"remote": (0.0, 0.0), "inproc": (0.0, 0.0)}
            clients = {k: InferenceClient(client, inbox=f"bench-{k}") for k in pipes}
            try:
                for ic in clients.values():  # warm up: connections, metadata, first batches
                    bench_pipeline(ic, rows[:2000])
                for _ in range(rounds):  # alternate, so both see the same machine
                    for k, ic in clients.items():
                        rate, mean_batch, results = bench_pipeline(ic, rows)
                        got = np.stack([r.outputs["probabilities"] for r in results[:: max(1, n_req // 500)]])
                        np.testing.assert_allclose(got, want[:: max(1, n_req // 500)], rtol=1e-6, atol=1e-7)
                        best[k] = max(best[k], (rate, mean_batch))
            finally:
                for ic in clients.values():
                    ic.close()
                for h in pipes.values():
                    h.stop()
        batched, b_batch = best["remote"]
        inproc, i_batch = best["inproc"]
        print(
            f"(b) pipeline, batched remote operator (RemoteModel, <= {REMOTE_BATCH} rows per call): "
            f"{batched:,.0f} req/s (mean batch {b_batch:.0f} rows)"
        )
        print(f"(c) pipeline, model in-process (OnnxModel): {inproc:,.0f} req/s (mean batch {i_batch:.0f} rows)")
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    slow_port = free_port()
    slow_server = start_model_server(
        slow_port, ["--python", "slow=_latency_model:predict", "--instances", "8", "--max-inflight", "8"]
    )
    try:
        with process_cluster(n_workers=1) as client:
            overlap = bench_overlap(client, slow_port, 3000 if q else 10_000)
    finally:
        slow_server.terminate()
        try:
            slow_server.wait(10)
        except subprocess.TimeoutExpired:
            slow_server.kill()
    gain = overlap[4] / overlap[1]
    print(
        f"20 ms remote model, {OVERLAP_BATCH}-row batches: {overlap[1]:,.0f} req/s at max_inflight=1, "
        f"{overlap[4]:,.0f} at max_inflight=4: overlap gain {gain:.2f}x (target >= 3)"
    )
    print(
        f"batched vs unary: {batched / unary:.1f}x (target >= 10x); "
        f"batched vs in-process: {batched / inproc:.2f}x (target >= 0.5x)"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
                "unary_req_s": round(unary),
                "batched_req_s": round(batched),
                "inproc_req_s": round(inproc),
                "batched_vs_unary": round(batched / unary, 2),
                "batched_vs_inproc": round(batched / inproc, 3),
                "overlap_inflight1_req_s": round(overlap[1]),
                "overlap_inflight4_req_s": round(overlap[4]),
                "overlap_gain": round(gain, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
