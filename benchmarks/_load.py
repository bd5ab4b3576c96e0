"""Load generators for the benchmarks: producers that run in their own processes.

Each producer connects its own Dask client and :class:`~daskinfer.InferenceClient` to the
scheduler and sends requests (a burst as fast as it can, or an open loop at a fixed rate);
it reports what it measured itself (requests answered, time, latencies).  Several producers
are started at once and their figures are added up.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _produce(
    address: str,
    inbox: str,
    mode: str,
    n: int,
    rate: float,
    seconds: float,
    block: int,
    seed: int,
    start_at: float,
    out: Any,
) -> None:
    from distributed import Client

    from daskinfer import InferenceClient
    from daskinfer.testing import random_rows

    rows = random_rows(max(n, 1000) if mode != "blocks" else block, seed=seed)
    with Client(address) as client, InferenceClient(client, inbox=inbox) as ic:
        ic.submit(rows[0]).result(60)  # connected, routes known
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        futures = []
        if mode == "burst":
            futures = [ic.submit(rows[i]) for i in range(n)]
        elif mode == "blocks":
            futures = [ic.submit_many(rows) for _ in range(n)]
        else:  # open loop at ``rate`` requests/s for ``seconds``
            sent = 0
            while True:
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
                for _ in range(int(rate * elapsed) - sent):
                    futures.append(ic.submit(rows[sent % len(rows)]))
                    sent += 1
                time.sleep(0.0005)
        results = [f.result(300) for f in futures]
        t1 = time.perf_counter()
    ok = sum(r.ok for r in results)
    lat = np.array([r.latency for r in results if r.latency is not None]) * 1e3
    rows_done = ok * (block if mode == "blocks" else 1)
    batch = float(np.mean([r.timings.get("batch", 0) for r in results])) if results else 0.0
    out.put(
        {
            "requests": len(results),
            "ok": ok,
            "rows": rows_done,
            "seconds": t1 - t0,
            "lat_ms": lat.tolist(),
            "batch": batch,
        }
    )


def run_spawned(target: Callable[..., None], args: Sequence[tuple]) -> list[Any]:
    """Run ``target(*a, out)`` for each ``a`` of ``args``, each in a process of its own, all at once;
    return what each put on the queue ``out`` (one item each)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in args]
    for p in procs:
        p.start()
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return reports


def run_producers(
    address: str,
    inbox: str,
    producers: int,
    *,
    mode: str = "burst",
    n: int = 0,
    rate: float = 0.0,
    seconds: float = 0.0,
    block: int = 4096,
) -> dict[str, Any]:
    """Run ``producers`` processes at once; return the aggregate and each one's latency percentiles.

    ``mode``: ``"burst"`` (``n`` single rows each, as fast as possible), ``"blocks"`` (``n`` blocks of
    ``block`` rows each) or ``"open"`` (``rate`` requests/s each for ``seconds``).
    """
    start_at = time.time() + 8.0  # every producer connected by then
    reports = run_spawned(
        _produce, [(address, inbox, mode, n, rate, seconds, block, i, start_at) for i in range(producers)]
    )
    wall = max(r["seconds"] for r in reports)
    lat_all = np.concatenate([np.array(r["lat_ms"]) for r in reports]) if reports else np.zeros(1)
    return {
        "rows_s": sum(r["rows"] for r in reports) / wall,
        "requests_s": sum(r["requests"] for r in reports) / wall,
        "ok": sum(r["ok"] for r in reports),
        "requests": sum(r["requests"] for r in reports),
        "batch": float(np.mean([r["batch"] for r in reports])),
        "p50_ms": float(np.percentile(lat_all, 50)) if len(lat_all) else 0.0,
        "p99_ms": float(np.percentile(lat_all, 99)) if len(lat_all) else 0.0,
        "p99_ms_each": [round(float(np.percentile(r["lat_ms"], 99)), 2) if r["lat_ms"] else 0.0 for r in reports],
    }
