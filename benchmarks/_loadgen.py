"""HTTP load generator of ``gateway.py``, run in its own process (aiohttp client).

Closed loop: ``--concurrency`` connections, each sending its next request as soon as the
last one is answered.  Open loop: requests at a fixed ``--rate`` whatever the answers
(latency counted from each request's scheduled time, so a slow server cannot hide its
queue).  Prints one JSON line: requests, errors, req/s, p50 and p99 latency in ms.

    python _loadgen.py URL BODIES.json --mode closed --concurrency 64 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

import aiohttp
import numpy as np

from daskinfer import eventloop  # the loop distributed.admin.event-loop names, like the servers'


async def closed_loop(url: str, bodies: list[tuple[bytes, dict]], concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < end:
            body, headers = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*[worker(session, k) for k in range(concurrency)])
        elapsed = time.perf_counter() - start
    return _figures(latencies, errors, elapsed)


async def open_loop(url: str, bodies: list[tuple[bytes, dict]], rate: float, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    n = max(1, int(rate * duration))
    interval = 1.0 / rate

    async def one(session: aiohttp.ClientSession, i: int, scheduled: float) -> None:
        nonlocal errors
        body, headers = bodies[i % len(bodies)]
        try:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
        except aiohttp.ClientError:
            errors += 1
        latencies.append(time.perf_counter() - scheduled)

    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            scheduled = start + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(session, i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return _figures(latencies, errors, elapsed)


def _figures(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "req_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("bodies", help="JSON file: a list of {body: base64, headers: {...}}")
    p.add_argument("--mode", choices=["closed", "open"], required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args()
    with open(args.bodies) as f:
        bodies = [(base64.b64decode(b["body"]), b["headers"]) for b in json.load(f)]
    if args.mode == "closed":
        figures = eventloop.run(closed_loop(args.url, bodies, args.concurrency, args.duration))
    else:
        figures = eventloop.run(open_loop(args.url, bodies, args.rate, args.duration))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
