"""The model server is killed mid-stream and restarted on the same port.

Every request ends with a result or an error within its deadline, none is answered
twice, results equal local inference, and requests flow again once the server is back.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from daskinfer import ModelServer, OnnxModel, RemoteModel
from daskinfer.exceptions import RemoteModelError
from daskinfer.testing import random_rows, run_onnx_directly

DEADLINE = 3.0
SLACK = 1.5  # scheduling slack on a 2-core machine whose cores are busy


@pytest.mark.parametrize(
    "breaker_failures",
    [5, 100_000],
    ids=["breaker-fails-fast", "retries-ride-through"],
)
def test_server_killed_and_restarted_mid_stream(mlp_path, breaker_failures):
    x = random_rows(4096, seed=21)
    want = run_onnx_directly(mlp_path, {"x": x})["probabilities"]
    first = ModelServer(OnnxModel("mlp", mlp_path), grpc_port=0, serve_http=False).start()
    port = first.grpc_port
    servers = [first]

    async def main():
        loaded = RemoteModel(
            "mlp",
            f"127.0.0.1:{port}",
            retries=6,
            backoff_base=0.02,
            backoff_max=0.2,
            timeout=1.0,
            deadline=DEADLINE,
            breaker_failures=breaker_failures,
            breaker_reset=0.2,
        ).load()
        outcomes: dict[int, tuple[str, object, float, float]] = {}
        twice: list[int] = []
        slots = asyncio.Semaphore(16)
        marks: dict[str, float] = {}

        async def one(i: int) -> None:
            async with slots:
                lo = (i * 7) % 4000
                rows = 1 + i % 8
                t0 = time.monotonic()
                try:
                    out = await loaded.apredict(x[lo : lo + rows], deadline=DEADLINE)
                    res = ("ok", (lo, rows, out["probabilities"]))
                except RemoteModelError as e:
                    res = ("err", e)
                if i in outcomes:
                    twice.append(i)
                outcomes[i] = (res[0], res[1], t0, time.monotonic() - t0)

        async def poll(cond, timeout=20.0):
            end = time.monotonic() + timeout
            while not cond():
                assert time.monotonic() < end, "timed out waiting"
                await asyncio.sleep(0.002)

        def recovered() -> int:
            t = marks.get("restarted")
            return 0 if t is None else sum(1 for k, r in outcomes.items() if r[0] == "ok" and r[2] > t)

        tasks: list[asyncio.Task] = []
        i = 0

        async def produce():
            nonlocal i
            # bounded: at most 20000 requests or 40 s, stop once 50 requests succeeded after the restart
            end = time.monotonic() + 40
            while i < 20000 and time.monotonic() < end and recovered() < 50:
                await slots.acquire()
                slots.release()
                tasks.append(asyncio.ensure_future(one(i)))
                i += 1
                # while the circuit is open, requests fail in microseconds: slow down so that the
                # count bound is not spent before the server is back
                await asyncio.sleep(0 if loaded.breaker.state == "closed" else 0.001)

        producer = asyncio.ensure_future(produce())
        await poll(lambda: len(outcomes) >= 200)
        await asyncio.to_thread(servers[0].stop)  # killed mid-stream: running calls are cancelled
        marks["killed"] = time.monotonic()
        await poll(lambda: loaded.stats.failures > 0)  # clients saw it go
        if breaker_failures == 5:  # keep it down until the circuit opened (else a quick restart may beat it)
            await poll(lambda: loaded.breaker.times_opened >= 1)
        servers.append(
            await asyncio.to_thread(ModelServer(OnnxModel("mlp", mlp_path), grpc_port=port, serve_http=False).start)
        )
        marks["restarted"] = time.monotonic()
        await producer
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE + 30)
        loaded.close()
        return outcomes, twice, i, loaded.stats, loaded.breaker, marks

    try:
        outcomes, twice, issued, stats, breaker, marks = asyncio.run(main())
    finally:
        for s in servers:
            s.stop()
    assert not twice, f"answered twice: {twice[:10]}"
    assert sorted(outcomes) == list(range(issued))  # every request ended
    oks = [r for r in outcomes.values() if r[0] == "ok"]
    errs = [r for r in outcomes.values() if r[0] == "err"]
    assert max(r[3] for r in outcomes.values()) <= DEADLINE + SLACK  # within its deadline
    for _, (lo, rows, got), _, _ in oks:
        np.testing.assert_array_equal(got, want[lo : lo + rows])
    assert sum(1 for r in oks if r[2] > marks["restarted"]) >= 50  # it flows again after the restart
    assert stats.failures > 0
    if breaker_failures == 5:  # the circuit opened while the server was down and closed once it was back
        assert breaker.times_opened >= 1 and breaker.state == "closed" and stats.fast_failures > 0
    else:  # no circuit: requests retried through the restart
        assert breaker.times_opened == 0 and stats.retries > 0
    for _, e, _, _ in errs:  # errors say which service, which call and why
        assert e.service == f"grpc://127.0.0.1:{servers[0].grpc_port or servers[1].grpc_port}"
        assert e.call == "ModelInfer" and e.retryable
        assert any(w in str(e) for w in ("UNAVAILABLE", "circuit is open", "deadline passed", "CANCELLED")), str(e)
