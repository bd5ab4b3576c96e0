"""Throughput and latency of a pipeline whose inbox and outbox are Redis Streams.

Measured in one run, on the bundled MLP (16->64->64->2):

1. end to end with columnar blocks of 4096 rows per message (rows/s);
2. end to end with one request per message (requests/s);
3. latency p50/p99 end to end at 10% of the peak single-request rate of (2).

A ``redis-server`` (no persistence) on a free loopback port, a `dask scheduler` process and two
one-thread `dask worker` processes; the client runs in this process.  Everything shares this
machine's cores, so read the figures against ``benchmarks/throughput.py`` (the embedded broker)
on the same box.  The last line printed is one JSON object.

    python benchmarks/redis.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

# this file is named like the redis package: import the package before this folder goes on the path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
import redis  # noqa: E402
import redis.asyncio  # noqa: E402,F401

sys.path.append(_HERE)
from _cluster import free_port, process_cluster  # noqa: E402
from throughput import bench_blocks, bench_latency, bench_single  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.connectors.redis import RedisTransport  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows  # noqa: E402

BLOCK = 4096


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on loopback without persistence; yield its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    conn.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
            conn.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    parser.add_argument("--partitions", type=int, default=2, help="inbox partitions (runners)")
    args = parser.parse_args()
    q = args.quick
    n_single = 30_000 if q else 100_000
    n_blocks = 100 if q else 400
    lat_seconds = 3.0 if q else 8.0
    t_start = time.perf_counter()

    block = random_rows(BLOCK, seed=1)
    rows = random_rows(n_single, seed=2)

    with redis_server() as url, process_cluster(n_workers=2) as client:
        deploy(client, OnnxModel("mlp", bundled_model_path()))
        pipe = Pipeline(
            model="mlp", inbox="bench", partitions=args.partitions, connector="redis", connector_options={"url": url}
        )
        handle = deploy_pipeline(client, pipe)
        with InferenceClient(client, inbox="bench", transport=RedisTransport(url)) as ic:
            bench_single(ic, rows[:2000])  # warm up
            blocks = bench_blocks(ic, block, n_blocks)
            print(f"redis pipeline, columnar blocks of {BLOCK}: {blocks:,.0f} rows/s")
            single, mean_batch, _ = max(bench_single(ic, rows) for _ in range(2 if q else 3))
            print(
                f"redis pipeline, one request per message: {single:,.0f} requests/s (mean batch {mean_batch:.0f} rows)"
            )
            p50, p99, achieved = bench_latency(ic, rows, single * 0.1, lat_seconds)
            print(f"latency at 10% load ({achieved:,.0f} req/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            assert ic.duplicates == 0
        handle.stop()

    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
                "redis_single_req_s": round(single),
                "redis_block_rows_s": round(blocks),
                "redis_p99_ms_10pct": round(p99, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
