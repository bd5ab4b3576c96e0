"""Quickstart: the whole data path on one machine in well under a minute.

``python -m daskinfer.quickstart`` starts a local Dask cluster, deploys the
bundled MLP (ONNX), starts a pipeline on the embedded broker, sends single rows
and blocks through it, checks the answers against onnxruntime run directly, and
prints results and throughput.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daskinfer.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    parser.add_argument("--requests", type=int, default=20_000, help="single-row requests to send (default 20000)")
    parser.add_argument("--blocks", type=int, default=100, help="4096-row blocks to send (default 100)")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
    from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly

    t_start = time.perf_counter()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        print(f"cluster: {len(client.scheduler_info()['workers'])} workers at {cluster.scheduler_address}")
        deploy(client, OnnxModel("mlp", bundled_model_path()))
        handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="requests", partitions=args.workers))
        print(f"model 'mlp' deployed; pipeline {handle.name!r} running on {args.workers} partitions")
        with InferenceClient(client, inbox="requests") as ic:
            x = random_rows(args.requests, seed=1)
            expected = run_onnx_directly(bundled_model_path(), {"x": x})["probabilities"]

            first = ic.submit(x[0]).result(30)
            print(
                f"one request: id={first.id} -> {first.value()} (model {first.model} v{first.version}, "
                f"{first.timings['latency'] * 1e3:.1f} ms)"
            )

            t0 = time.perf_counter()
            futures = [ic.submit(row, key=f"user-{i % 8}") for i, row in enumerate(x)]
            results = [f.result(60) for f in futures]
            dt = time.perf_counter() - t0
            got = np.stack([r.value() for r in results])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            lat = np.array([r.timings["latency"] for r in results]) * 1e3
            batch = np.array([r.timings["batch"] for r in results])
            print(
                f"{args.requests} single-row requests sent at once: {args.requests / dt:,.0f} requests/s, "
                f"mean batch {batch.mean():.0f} rows (latency in this burst: p50 {np.percentile(lat, 50):.0f} ms, "
                f"mostly queueing); all answers match onnxruntime"
            )

            block = random_rows(4096, seed=2)
            t0 = time.perf_counter()
            futures = [ic.submit_many(block) for _ in range(args.blocks)]
            outs = [f.result(60).value() for f in futures]
            dt = time.perf_counter() - t0
            np.testing.assert_allclose(
                outs[-1], run_onnx_directly(bundled_model_path(), {"x": block})["probabilities"], rtol=1e-5, atol=1e-6
            )
            print(f"{args.blocks} blocks of 4096 rows: {args.blocks * 4096 / dt:,.0f} inferences/s")
        handle.stop()
    print(f"done in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
