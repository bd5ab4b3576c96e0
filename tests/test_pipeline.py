"""The data path end to end on a real LocalCluster: inbox -> partitions -> outbox."""

from __future__ import annotations

import collections
import time
import uuid

import dask
import numpy as np
import pytest

from daskinfer import InferenceClient, OnnxModel, Pipeline, PythonModel, deploy, deploy_pipeline, undeploy
from daskinfer.connectors.embedded import BrokerRPC
from daskinfer.testing import check_key_order, check_outputs, collect_results, random_rows, run_onnx_directly
from daskinfer.wire import codec


@pytest.fixture(scope="module")
def mlp(client, mlp_path):
    deploy(client, OnnxModel("mlp-pipe", mlp_path))
    yield "mlp-pipe"
    undeploy(client, "mlp-pipe")


def _inbox() -> str:
    return f"in-{uuid.uuid4().hex[:8]}"


def _dead_letters(client, topic: str) -> list[dict]:
    async def read():
        b = BrokerRPC(client.scheduler)
        n = (await b.info(topic))["partitions"]
        msgs = []
        for p in range(n):
            msgs += (await b.get(topic, p, 0, 100_000))["messages"]
        return [codec.decode(m) for m in msgs]

    return client.sync(read)


def test_20k_mixed_requests_answered_exactly_once_in_key_order(client, mlp, mlp_path, poll):
    inbox = _inbox()
    dead = f"dead-{inbox}"
    handle = deploy_pipeline(
        client, Pipeline(model=mlp, inbox=inbox, partitions=3, dead_letter=dead, max_batch_size=512)
    )
    rng = np.random.default_rng(0)
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            sent: dict[str, tuple[np.ndarray, bool]] = {}
            order: dict[str, list[str]] = collections.defaultdict(list)
            bad: dict[str, str] = {}
            n_requests = 20_000
            for i in range(n_requests):
                key = f"k{i % 7}"
                if i % 500 == 250:  # malformed but decodable: the client is answered with an error
                    kind = ("dtype", "shape", "extra")[(i // 500) % 3]
                    inputs = {
                        "dtype": {"x": np.zeros(16, np.float64)},
                        "shape": {"x": np.zeros(15, np.float32)},
                        "extra": {"x": np.zeros(16, np.float32), "y": np.zeros(16, np.float32)},
                    }[kind]
                    rid = ic.send(inputs, key=key)
                    bad[rid] = kind
                elif i % 10 == 0:  # a block of 1..16 rows in one message
                    block = random_rows(int(rng.integers(1, 17)), seed=i)
                    rid = ic.send(block, batched=True, key=key)
                    sent[rid] = (block, True)
                else:
                    row = random_rows(1, seed=i)[0]
                    rid = ic.send(row, key=key)
                    sent[rid] = (row, False)
                order[key].append(rid)
            # undecodable bytes straight into the inbox: they can only go to the dead-letter topic
            client.sync(BrokerRPC(client.scheduler).put, inbox, [(p, b"\xc1garbage") for p in range(3)])

            results = collect_results(ic, n_requests)
            assert ic.duplicates == 0
            ids = [r.id for r in results]
            assert len(ids) == len(set(ids)) == n_requests, "every request answered exactly once"
            assert set(ids) == set(sent) | set(bad)

            by_id = {r.id: r for r in results}
            check_outputs(by_id, sent, mlp_path)  # equal to onnxruntime run directly on the same rows
            assert all(by_id[rid].model == mlp and by_id[rid].version == "1" for rid in sent)

            words = {"dtype": "float32", "shape": "shape", "extra": "unexpected input 'y'"}
            for rid, kind in bad.items():
                r = by_id[rid]
                assert not r.ok and r.error_type == "InputValidationError"
                assert mlp in r.error and words[kind] in r.error, r.error

            check_key_order(results, order)  # results of each key arrive in request order

        letters = _dead_letters(client, dead)
        kinds = collections.Counter(d["error_type"] for d in letters)
        assert kinds["CodecError"] == 3 and kinds["InputValidationError"] == len(bad)
        assert all(isinstance(d["data"], bytes) for d in letters)
        # (a runner counts its answers once their write returns: the client may have them a moment before)
        poll(
            lambda: sum(x["answered"] for x in handle.status()["runners"]) == n_requests + 3,
            what="the runners counting every answer written",
        )
    finally:
        handle.stop()


def test_model_error_fails_only_the_requests_at_fault(client):
    def no_nans(x):
        if np.isnan(x).any():
            raise ValueError("NaN in input")
        return x.sum(axis=1)

    deploy(client, PythonModel("nan-hater", no_nans, inputs={"x": ("float32", (None, 4))}))
    inbox = _inbox()
    handle = deploy_pipeline(client, Pipeline(model="nan-hater", inbox=inbox, partitions=1))
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            rows = np.arange(400, dtype=np.float32).reshape(100, 4)
            rows[37, 2] = np.nan
            futures = [ic.submit(r) for r in rows]
            results = [f.result(30) for f in futures]
        failed = [i for i, r in enumerate(results) if not r.ok]
        assert failed == [37]
        assert results[37].error_type == "ValueError" and "NaN in input" in results[37].error
        np.testing.assert_allclose(
            [r.value() for i, r in enumerate(results) if i != 37], np.delete(rows, 37, axis=0).sum(axis=1)
        )
    finally:
        handle.stop()
        undeploy(client, "nan-hater")


def test_unknown_model_and_deadline_become_error_results(client, mlp):
    inbox = _inbox()
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=inbox, partitions=1))
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            r = ic.submit(random_rows(1)[0], model="no-such-model").result(30)
            assert r.error_type == "ModelNotFoundError" and "no-such-model" in r.error and mlp in r.error
            r = ic.submit(random_rows(1)[0], deadline=-1.0).result(30)
            assert r.error_type == "DeadlineExceededError"
            assert ic.submit(random_rows(1)[0]).result(30).ok, "the pipeline goes on"
    finally:
        handle.stop()


@pytest.mark.parametrize("transport", ["direct", "topic"])
def test_fast_producer_is_pushed_back_and_memory_stays_bounded(client, transport):
    def slow(x):
        time.sleep(0.005)  # one instance: at most 20 rows per 5 ms, slower than the producer
        return x * 2

    deploy(client, PythonModel("slow", slow))
    inbox = _inbox()
    cap = 20_000  # bytes: requests travel in frames, so the bounds that matter are in bytes
    with dask.config.set(
        {
            "daskinfer.direct.max-queued-bytes": cap,
            "daskinfer.direct.window": 2,
            "daskinfer.broker.max-bytes": cap,
            "daskinfer.client.flush-batch": 20,
        }
    ):
        handle = deploy_pipeline(client, Pipeline(model="slow", inbox=inbox, partitions=1, max_batch_size=20))
        ic = InferenceClient(client, inbox=inbox, max_pending=500, transport=transport)

    def held() -> int:  # requests waiting in the partition's bounded queue (the inbox topic, or the worker's queue)
        if transport == "topic":
            return client.sync(BrokerRPC(client.scheduler).info, inbox)["bytes"][0]
        return handle.status()["runners"][0]["direct_queued_bytes"]

    try:
        with ic:
            n = 4000
            lengths, queued = [], []
            rows = np.arange(n, dtype=np.float32)[:, None]
            for i in range(n):
                ic.send(rows[i], key="one")
                if i % 200 == 0:
                    lengths.append(held())
                    queued.append(ic.queued)
            results = collect_results(ic, n)
        assert len({r.id for r in results}) == n
        assert max(lengths) <= cap, "the partition's queue never holds more than its bound"
        assert max(queued) <= 500, "the client buffers at most max_pending requests"
        assert max(lengths) >= cap // 2, "the producer really was faster than the model"
        np.testing.assert_allclose(
            np.stack([r.value() for r in sorted(results, key=lambda r: int(r.id.rsplit("-", 1)[1]))]), rows * 2
        )
    finally:
        handle.stop()
        undeploy(client, "slow")


def test_async_client_api(cluster, mlp, mlp_path):
    """The same API with an asynchronous Dask client: await futures, async iteration."""
    import asyncio

    from distributed import Client

    inbox = _inbox()

    async def run():
        async with Client(cluster.scheduler_address, asynchronous=True) as aclient:
            handle = await deploy_pipeline(aclient, Pipeline(model=mlp, inbox=inbox, partitions=2))
            rows = random_rows(300, seed=12)
            async with InferenceClient(aclient, inbox=inbox) as ic:
                one = await ic.submit(rows[0])
                block = await ic.predict(rows)
                many = await asyncio.gather(*(ic.submit(r, key="k") for r in rows[:100]))
                for r in rows[100:110]:
                    ic.send(r, key="s")
                streamed = []
                async for res in ic.aresults(timeout=10):
                    streamed.append(res)
                    if len(streamed) == 10:
                        break
            await handle.stop()
            return one, block, many, streamed

    one, block, many, streamed = asyncio.run(run())
    expected = run_onnx_directly(mlp_path, {"x": random_rows(300, seed=12)})["probabilities"]
    np.testing.assert_allclose(one.value(), expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([r.value() for r in many]), expected[:100], rtol=1e-5, atol=1e-6)
    assert len(streamed) == 10
    np.testing.assert_allclose(np.stack([r.value() for r in streamed]), expected[100:110], rtol=1e-5, atol=1e-6)


def test_a_pipeline_with_a_max_delay_answers_and_batches_within_it(client, mlp, mlp_path):
    """max_delay > 0 holds a batch up to that long for more rows, then sends it (it never sent it)."""
    inbox = _inbox()
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=inbox, partitions=1, max_delay="50ms"))
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            rows = random_rows(40, seed=41)
            t0 = time.monotonic()
            first = ic.submit(rows[0]).result(60)
            assert first.ok and time.monotonic() - t0 < 5
            futures = []
            for r in rows[1:]:  # a trickle: each flushed alone, gathered by the delay into a few batches
                futures.append(ic.submit(r))
                time.sleep(0.002)
            results = [f.result(60) for f in futures]
    finally:
        handle.stop()
    assert all(r.ok for r in results)
    np.testing.assert_allclose(
        [r.value() for r in [first, *results]],
        run_onnx_directly(mlp_path, {"x": rows})["probabilities"],
        rtol=1e-5,
        atol=1e-6,
    )
    assert max(r.timings["batch"] for r in results) > 1, "the delay let batches fill"


def test_an_array_reused_after_submit_is_sent_as_it_was_when_submitted(client, mlp, mlp_path):
    """A caller that refills one buffer for each request (a common loop) gets each request's own
    answer: what is sent is the array as it was when submit returned, not when the client's loop
    got to it."""
    inbox = _inbox()
    handle = deploy_pipeline(client, Pipeline(model=mlp, inbox=inbox, partitions=2))
    blocks = [random_rows(64, seed=100 + i) for i in range(40)]
    rows = random_rows(40, seed=99)
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            block_buf, row_buf = np.empty_like(blocks[0]), np.empty_like(rows[0])
            futures = []
            for block, row in zip(blocks, rows):
                block_buf[:] = block
                futures.append(ic.submit_many(block_buf))
                row_buf[:] = row
                futures.append(ic.submit(row_buf))
            results = [f.result(60) for f in futures]
    finally:
        handle.stop()
    expected_blocks = run_onnx_directly(mlp_path, {"x": np.concatenate(blocks)})["probabilities"]
    expected_rows = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
    got_blocks = np.concatenate([r.value() for r in results[0::2]])
    got_rows = np.stack([r.value() for r in results[1::2]])
    np.testing.assert_allclose(got_blocks, expected_blocks, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_rows, expected_rows, rtol=1e-5, atol=1e-6)


class _ReusesItsOutputBuffer:
    """A model that writes every answer into the same array (a common trick to save allocations)."""

    def __init__(self):
        self.out = np.empty((0, 16), np.float32)

    def predict(self, x):
        if self.out.shape != x.shape:
            self.out = np.empty_like(x)
        np.multiply(x, 3.0, out=self.out)
        return self.out


def test_a_model_that_reuses_its_output_array_gets_each_batch_answered_with_its_own_values(client):
    """Results leave the worker after the model has moved on to the next batch: what is sent must not
    be the model's array itself, which the next batch overwrites."""
    inbox = _inbox()
    deploy(client, PythonModel("reuses-buffer", _ReusesItsOutputBuffer))
    handle = deploy_pipeline(client, Pipeline(model="reuses-buffer", inbox=inbox, partitions=1, max_batch_size=64))
    blocks = [random_rows(64, seed=300 + i) for i in range(300)]
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            results = [f.result(60) for f in [ic.submit_many(b) for b in blocks]]
    finally:
        handle.stop()
        undeploy(client, "reuses-buffer")
    bad = [i for i, (r, b) in enumerate(zip(results, blocks)) if not np.allclose(r.value(), b * 3.0)]
    assert not bad, f"{len(bad)} of {len(blocks)} blocks answered with another batch's values (first: {bad[:5]})"
