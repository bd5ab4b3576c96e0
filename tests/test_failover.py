"""Nothing lost when workers join or leave, or a runner stops (embedded broker).

These tests own their cluster (``gen_cluster``: an in-process scheduler and workers), since
they add and retire workers and restart partitions.  Killing a worker process is in
``test_pipelining.py``, ``test_chaos.py`` and ``test_cluster_cli.py``.
"""

from __future__ import annotations

import asyncio

import numpy as np
from distributed import Worker
from distributed.utils_test import gen_cluster
from timing import apoll, scaled

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly

TWO_WORKERS = [("127.0.0.1", 1)] * 2


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=scaled(120))
async def test_partitions_follow_workers_that_join_and_leave(c, s, a, b):
    mlp_path = bundled_model_path()
    await deploy(c, OnnxModel("mlp", mlp_path))
    handle = await deploy_pipeline(c, Pipeline(model="mlp", inbox="elastic", partitions=4))
    rows = random_rows(20_000, seed=4)
    expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]

    async def owners(n: int) -> bool:  # partitions placed on n workers
        return len(set((await handle.status())["assigned"].values())) == n

    async with InferenceClient(c, inbox="elastic") as ic:
        futures = [ic.submit(rows[i], key=f"k{i % 5}") for i in range(5000)]
        async with Worker(s.address, nthreads=1) as new:
            await apoll(lambda: owners(3), 60, what="a partition on the new worker")
            futures += [ic.submit(rows[i], key=f"k{i % 5}") for i in range(5000, 12_000)]
            await c.retire_workers([a.address, b.address], close_workers=True)  # scale down to the new one
            await apoll(lambda: set(s.workers) == {new.address}, 60, what="scale down to the new worker")
            futures += [ic.submit(rows[i], key=f"k{i % 5}") for i in range(12_000, 20_000)]
            results = await asyncio.wait_for(asyncio.gather(*futures), scaled(120))

            async def all_placed() -> bool:
                return len((await handle.status())["assigned"]) == 4

            await apoll(all_placed, 30, what="every partition on the last worker")
            status = await handle.status()
            assert set(status["assigned"].values()) == {new.address}
            assert status["moves"] >= 1
            await handle.stop()
    assert all(r.ok for r in results)
    np.testing.assert_allclose(np.stack([r.value() for r in results]), expected, rtol=1e-5, atol=1e-6)


@gen_cluster(client=True, nthreads=TWO_WORKERS, timeout=scaled(90))
async def test_a_runner_that_stops_by_itself_is_restarted(c, s, a, b):
    mlp_path = bundled_model_path()
    await deploy(c, OnnxModel("mlp", mlp_path))
    handle = await deploy_pipeline(c, Pipeline(model="mlp", inbox="phoenix", partitions=2))
    rows = random_rows(2000, seed=6)
    async with InferenceClient(c, inbox="phoenix") as ic:
        first = await asyncio.gather(*[ic.submit(r, key="a") for r in rows[:1000]])
        assert all(r.ok for r in first)
        worker = (await handle.status())["assigned"][0]
        # what a runner does when its broker calls fail
        await c.rpc(worker).daskinfer_runner_stop(pipeline="phoenix", partition=0, drain=False)

        async def restarted() -> bool:
            return (await handle.status())["restarts"] >= 1

        await apoll(restarted, 30, what="the controller to restart the partition")
        results = await asyncio.wait_for(
            asyncio.gather(*[ic.submit(r, key=f"k{i}") for i, r in enumerate(rows[1000:])]), scaled(60)
        )
    assert all(r.ok for r in results)
    expected = run_onnx_directly(mlp_path, {"x": rows[1000:]})["probabilities"]
    np.testing.assert_allclose(np.stack([r.value() for r in results]), expected, rtol=1e-5, atol=1e-6)

    async def all_running() -> bool:
        return all(r["state"] == "running" for r in (await handle.status())["runners"])

    await apoll(all_running, 30, what="all runners")
    await handle.stop()
