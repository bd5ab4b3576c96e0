"""Does throughput grow with workers?  And how fast does an adaptive cluster add one under a burst?

1. For each worker count (``--workers 1,2`` here; ``1,2,4,8`` on a bigger machine), a cluster of
   ``dask scheduler`` + N ``dask worker`` processes serves one pipeline (2 partitions per worker);
   producer processes send blocks of rows at it as fast as they can; rows/s is the aggregate.
   ``scaling_efficiency`` = throughput at the largest count / (count x throughput at 1).
2. A ``LocalCluster`` that starts with one worker under ``InferenceAdaptive`` (max 2) gets more
   requests than one worker serves (a model of 2 ms per call): ``scale_up_s`` is the time from the
   start of the load to the first answer from a partition on the added worker.  Every request is
   checked: ``lost`` and ``duplicated`` count those never answered and answered twice.

Everything shares this machine's cores: with 2 cores, two workers plus producers already
oversubscribe it, so efficiency here shows the overheads, not the design's ceiling.  The last
line printed is one JSON object.

    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import process_cluster  # noqa: E402
from _load import run_producers  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.testing import bundled_model_path  # noqa: E402


def throughput(n_workers: int, producers: int, n_blocks: int, block: int) -> float:
    with process_cluster(n_workers=n_workers) as client:
        deploy(client, OnnxModel("mlp", bundled_model_path()))
        handle = deploy_pipeline(client, Pipeline(model="mlp", inbox="scale", partitions=2 * n_workers))
        r = run_producers(client.scheduler.address, "scale", producers, mode="blocks", n=n_blocks, block=block)
        handle.stop()
    assert r["ok"] == r["requests"], r
    return r["rows_s"]


def _slow_model(x):
    time.sleep(0.002)  # a model that costs 2 ms per call: one worker serves ~8k rows/s in calls of 16
    return x * 2


def scale_up(rate: float, seconds: float) -> dict[str, float]:
    """An open loop at ``rate`` requests/s (more than one worker serves) on a one-worker adaptive cluster."""
    from distributed import Client, LocalCluster

    from daskinfer import PythonModel
    from daskinfer.control.scaling import InferenceAdaptive

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        deploy(client, PythonModel("slow", _slow_model))
        handle = deploy_pipeline(client, Pipeline(model="slow", inbox="burst", partitions=4, max_batch_size=16))
        first = next(iter(client.scheduler_info()["workers"]))
        cluster.adapt(
            Adaptive=InferenceAdaptive, minimum=1, maximum=2, interval="250ms", wait_count=40, target_lag="200ms"
        )
        rows = np.arange(1000, dtype=np.float32)[:, None]
        seen: dict[str, int] = {}
        ids: list[str] = []
        t_up = None
        next_check = 0.0
        with InferenceClient(client, inbox="burst") as ic:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                due = int(rate * (time.perf_counter() - t0)) - len(ids)
                for _ in range(due):
                    ids.append(ic.send(rows[len(ids) % 1000], key=f"k{len(ids) % 64}"))
                for r in ic.results(timeout=0.001):
                    seen[r.id] = seen.get(r.id, 0) + 1
                if t_up is None and time.perf_counter() > next_check:
                    next_check = time.perf_counter() + 0.25
                    st = handle.status()
                    if any(x.get("worker") != first and x.get("answered", 0) > 0 for x in st.get("runners", [])):
                        t_up = time.perf_counter() - t0
                time.sleep(0.002)
            deadline = time.monotonic() + 120
            while len(seen) < len(ids) and time.monotonic() < deadline:
                for r in ic.results(timeout=1.0):
                    seen[r.id] = seen.get(r.id, 0) + 1
            dropped = ic.duplicates
        handle.stop()
    return {
        "scale_up_s": round(t_up, 2) if t_up is not None else float("nan"),
        "lost": len(set(ids) - set(seen)),
        "duplicated": sum(1 for v in seen.values() if v > 1),  # answered twice from the caller's view
        "dropped_duplicates": dropped,  # redone after a move and dropped by the client
        "sent": len(ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2,4,8")
    parser.add_argument("--producers", type=int, default=2, help="producer processes")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    t_start = time.perf_counter()
    block = 1024
    n_blocks = 150 if args.quick else 600
    by_workers = {}
    for n in counts:
        by_workers[n] = throughput(n, args.producers, n_blocks, block)
        print(f"{n} worker(s): {by_workers[n]:,.0f} rows/s (blocks of {block} from {args.producers} producers)")
    top = max(counts)
    eff = by_workers[top] / (top * by_workers[min(counts)]) if min(counts) == 1 else float("nan")
    print(f"scaling efficiency at {top} workers: {eff:.2f} (cores here: {os.cpu_count()})")
    burst = scale_up(rate=12_000, seconds=20 if args.quick else 60)
    print(
        f"adaptive: under {burst['sent']:,} requests at 12k/s (one worker serves ~8k/s), a second worker served "
        f"after {burst['scale_up_s']} s; lost {burst['lost']}, duplicated {burst['duplicated']}"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
                "rows_s_by_workers": {str(k): round(v) for k, v in by_workers.items()},
                "scaling_efficiency": round(eff, 3),
                "scale_up_s": burst["scale_up_s"],
                "lost": burst["lost"],
                "duplicated": burst["duplicated"],
                "cores": os.cpu_count(),
                "dropped_duplicates": burst["dropped_duplicates"],
            }
        )
    )


if __name__ == "__main__":
    main()
