"""streamz operators: ``smart_batch`` and ``infer`` on local and Dask streams give the same
outputs as the model run directly; batches keep item order and respect their size limit."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from streamz import Stream

import daskinfer  # noqa: F401  (registers the operators)
from daskinfer import OnnxModel, PythonModel
from daskinfer.exceptions import InputValidationError
from daskinfer.models.registry import local_registry
from daskinfer.testing import random_rows, run_onnx_directly


def _direct(mlp_path, x):
    return run_onnx_directly(mlp_path, {"x": x})["probabilities"]


@pytest.fixture
def local_model(mlp_path):
    """An OnnxModel that ``infer`` loads into this process; removed again afterwards."""
    model = OnnxModel("mlp-local", mlp_path)
    yield model
    local_registry().retire(model.name, model.version)


def test_local_smart_batch_infer_flatten_equals_direct_inference(local_model, mlp_path):
    out = []
    source = Stream()
    source.smart_batch(max_batch_size=64).infer(local_model).flatten().sink(out.append)
    blocks = [random_rows(n, seed=i) for i, n in enumerate([1, 5, 64, 100, 3])]
    for b in blocks:
        source.emit(b)
    assert len(out) == len(blocks)
    for b, o in zip(blocks, out):
        assert set(o) == {"probabilities"}
        np.testing.assert_allclose(o["probabilities"], _direct(mlp_path, b), rtol=1e-6, atol=1e-7)


def test_local_infer_on_single_blocks_and_output_selection(local_model, mlp_path):
    out = []
    source = Stream()
    source.infer(local_model, output="probabilities").sink(out.append)
    x = random_rows(9, seed=3)
    source.emit(x)
    (got,) = out
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, _direct(mlp_path, x), rtol=1e-6, atol=1e-7)


def test_local_infer_by_name_of_a_model_loaded_here(local_model, mlp_path):
    local_registry().install_sync(local_model)
    out = []
    source = Stream()
    source.infer("mlp-local").sink(out.append)
    x = random_rows(4, seed=4)
    source.emit({"x": x})
    np.testing.assert_allclose(out[0]["probabilities"], _direct(mlp_path, x), rtol=1e-6, atol=1e-7)


def test_local_infer_bad_input_raises_input_validation_error(local_model):
    source = Stream()
    source.infer(local_model).sink(lambda x: None)
    with pytest.raises(InputValidationError, match=r"model 'mlp-local': input 'x' expects dtype float32, got float64"):
        source.emit(np.ones((2, 16)))


def test_smart_batch_groups_what_queues_while_downstream_is_busy():
    """An async downstream that holds each batch until released: a lone item goes at once;
    items that arrive meanwhile form the next batches, in order, up to max_batch_size rows."""

    async def main():
        loop = asyncio.get_running_loop()
        batches, releases = [], []

        def downstream(batch):
            batches.append(batch)
            fut = loop.create_future()
            releases.append(fut)
            return fut

        async def wait_for_batches(n):
            deadline = time.monotonic() + 10
            while len(batches) < n:
                assert time.monotonic() < deadline, f"only {len(batches)} of {n} batches came"
                await asyncio.sleep(0.001)

        source = Stream(asynchronous=True)
        source.smart_batch(max_batch_size=10, max_inflight=1).sink(downstream)
        sizes = [1, 3, 4, 5, 2, 12, 1, 6, 6]
        items = [np.full((s, 2), i) for i, s in enumerate(sizes)]
        for it in items:
            source.emit(it)
        # the first item went alone and at once; the rest wait for the one batch slot
        assert [[len(i) for i in b] for b in batches] == [[1]]
        k = 0
        while sum(len(b) for b in batches) < len(items):
            releases[k].set_result(None)
            k += 1
            await wait_for_batches(k + 1)
        for fut in releases[k:]:
            fut.set_result(None)
        return batches, items

    batches, items = asyncio.run(main())
    assert [[len(i) for i in b] for b in batches] == [[1], [3, 4], [5, 2], [12], [1, 6], [6]]
    flat = [it for b in batches for it in b]
    assert [int(it[0, 0]) for it in flat] == list(range(len(items)))  # order kept
    assert all(a is b for a, b in zip(flat, items))  # blocks pass through, not copies


# -- Dask streams --------------------------------------------------------------------------------


def test_dask_scatter_infer_gather_equals_direct_inference(client, mlp_deployed, mlp_path, poll):
    out = []
    source = Stream(asynchronous=False)  # built after the Client exists
    source.scatter().infer("mlp").buffer(8).gather().sink(out.append)
    blocks = [random_rows(n, seed=i) for i, n in enumerate([1, 7, 128, 2, 50] * 4)]
    for b in blocks:
        source.emit(b)
    poll(lambda: len(out) == len(blocks), what="all blocks answered")
    for b, o in zip(blocks, out):
        np.testing.assert_allclose(o["probabilities"], _direct(mlp_path, b), rtol=1e-6, atol=1e-7)


def test_dask_infer_output_emits_the_array(client, mlp_deployed, mlp_path, poll):
    out = []
    source = Stream(asynchronous=False)
    source.scatter().infer(OnnxModel("mlp", mlp_path), output="probabilities").gather().sink(out.append)
    x = random_rows(11, seed=8)
    source.emit(x)
    poll(lambda: len(out) == 1, what="the answer")
    assert isinstance(out[0], np.ndarray) and out[0].shape == (11, 2)
    np.testing.assert_allclose(out[0], _direct(mlp_path, x), rtol=1e-6, atol=1e-7)


def test_dask_infer_of_a_model_not_deployed_names_it(client, mlp_deployed, poll):
    from daskinfer.dataflow.streams import InferenceFailure

    futures = []
    source = Stream(asynchronous=False)
    source.scatter().infer("not-deployed").sink(futures.append)
    source.emit(random_rows(2))
    poll(lambda: len(futures) == 1, what="the task")
    failure = futures[0].result()
    assert isinstance(failure, InferenceFailure) and failure.error_type == "ModelNotFoundError"
    assert "model 'not-deployed' is not deployed here; deployed models: ['mlp']" in failure.error


def _batched_dask_chain(client, items, **batching):
    """Emit ``items`` at once on the client's loop through ``smart_batch(**batching).scatter()
    .infer("mlp", output=...).buffer(8).gather().flatten()``; return (the batches, the results)."""

    async def run():
        batches, out = [], []
        source = Stream(asynchronous=True, loop=client.loop)
        batched = source.smart_batch(**batching)
        batched.sink(batches.append)
        batched.scatter().infer("mlp", output="probabilities").buffer(8).gather().flatten().sink(out.append)
        for it in items:
            source.emit(it)
        deadline = time.monotonic() + 60
        while len(out) < len(items):
            assert time.monotonic() < deadline, f"{len(out)} of {len(items)} results"
            await asyncio.sleep(0.005)
        return batches, out

    return client.sync(run)


def test_dask_smart_batch_keeps_order_and_size_limit_under_load(client, mlp_deployed, mlp_path):
    """Many items emitted at once on the client's loop: batches form while scatters are in
    flight, never exceed max_batch_size rows, keep item order, and outputs match."""
    rng = np.random.default_rng(7)
    blocks = [random_rows(int(n), seed=i) for i, n in enumerate(rng.integers(1, 20, 300))]
    max_rows = 64

    batches, out = _batched_dask_chain(client, blocks, max_batch_size=max_rows, max_inflight=2)
    assert all(sum(len(i) for i in b) <= max_rows for b in batches)
    flat = [it for b in batches for it in b]
    assert len(flat) == len(blocks) and all(a is b for a, b in zip(flat, blocks))  # each item once, in order
    assert max(len(b) for b in batches) > 1  # batching happened
    # streamz's scatter() may finish two batches' uploads out of order, so answers are
    # matched to blocks by value: every block gets exactly one right answer
    assert len(out) == len(blocks)
    unmatched = {i: _direct(mlp_path, b) for i, b in enumerate(blocks)}
    for o in out:
        match = next(
            (
                i
                for i, want in unmatched.items()
                if want.shape == o.shape and np.allclose(o, want, rtol=1e-6, atol=1e-7)
            ),
            None,
        )
        assert match is not None, f"an answer of shape {o.shape} matches no block"
        del unmatched[match]
    assert not unmatched


def test_dask_infer_python_model(client, poll):
    daskinfer.deploy(client, PythonModel("neg", lambda x: -x))
    try:
        out = []
        source = Stream(asynchronous=False)
        source.scatter().infer("neg").gather().sink(out.append)
        source.emit(np.arange(5.0))
        poll(lambda: len(out) == 1, what="the answer")
        np.testing.assert_array_equal(out[0]["output"], -np.arange(5.0))
    finally:
        daskinfer.undeploy(client, "neg")


def test_dask_stream_failure_travels_as_a_value_and_the_stream_goes_on(client, mlp_deployed, poll):
    import numpy as np
    from streamz import Stream

    from daskinfer.dataflow.streams import InferenceFailure
    from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly

    source = Stream(asynchronous=False)
    out = source.scatter().infer(mlp_deployed, output="probabilities").buffer(4).gather().sink_to_list()
    good = random_rows(5, seed=11)
    source.emit(good)
    source.emit(np.zeros((3, 15), np.float32))  # wrong shape
    source.emit(good)
    poll(lambda: len(out) == 3, what="three items through the stream")
    bad = out[1]
    assert isinstance(bad, InferenceFailure) and not bad
    assert bad.error_type == "InputValidationError" and "expects shape" in bad.error and bad.model == mlp_deployed
    expected = run_onnx_directly(bundled_model_path(), {"x": good})["probabilities"]
    np.testing.assert_allclose(out[2], expected, rtol=1e-5, atol=1e-6)


def test_readme_dask_chain_goes_on_after_a_bad_item(client, mlp_deployed, mlp_path, poll):
    """The README's chain ``smart_batch().scatter().infer().buffer().gather().flatten()``:
    a bad item comes out as one InferenceFailure in its place and later items still flow."""
    from daskinfer.dataflow.streams import InferenceFailure

    out = []
    source = Stream()
    source.smart_batch(max_batch_size=1024).scatter().infer("mlp").buffer(8).gather().flatten().sink(out.append)
    good = [random_rows(2, seed=1), random_rows(3, seed=2)]
    source.emit(good[0])
    poll(lambda: len(out) == 1, what="the first answer")
    source.emit(np.zeros((4, 15), np.float32))  # wrong shape
    poll(lambda: len(out) == 2, what="the failure of the bad item")
    source.emit(good[1])
    poll(lambda: len(out) == 3, what="an answer after the bad item")
    assert isinstance(out[1], InferenceFailure) and out[1].error_type == "InputValidationError"
    assert "expects shape" in out[1].error and out[1].model == "mlp"
    for i, o in zip([0, 2], good):
        np.testing.assert_allclose(out[i]["probabilities"], _direct(mlp_path, o), rtol=1e-6, atol=1e-7)


def test_dask_batch_with_a_bad_item_answers_the_good_items_of_that_batch(client, mlp_deployed, mlp_path):
    """A batch of many items where one is bad: the good items of the same batch get their
    answers, the bad one gets its InferenceFailure; one result per item, none lost."""
    from daskinfer.dataflow.streams import InferenceFailure

    good = [random_rows(n, seed=20 + n) for n in (1, 2, 3, 4, 5, 6)]
    bad = np.zeros((7, 15), np.float32)
    items = good[:3] + [bad] + good[3:]

    batches, out = _batched_dask_chain(client, items, max_batch_size=1024, max_inflight=1)
    assert any(len(b) > 1 and any(i is bad for i in b) for b in batches), "the bad item was batched with others"
    failures = [o for o in out if isinstance(o, InferenceFailure)]
    assert len(failures) == 1 and "expects shape" in failures[0].error
    answers = sorted((o for o in out if not isinstance(o, InferenceFailure)), key=len)
    assert len(answers) == len(good)
    for g, o in zip(good, answers):
        np.testing.assert_allclose(o, _direct(mlp_path, g), rtol=1e-6, atol=1e-7)


def test_only_the_operators_meant_for_users_are_registered_on_streamz():
    """The partition's own nodes stay internal: streamz's ``Stream`` gets ``smart_batch``, ``infer``
    and ``run_pipeline``, not the data path's answering and writing nodes."""
    for name in ("smart_batch", "infer", "run_pipeline"):
        assert callable(getattr(Stream, name, None)), name
    for name in ("answer_batches", "write_results"):
        assert not hasattr(Stream, name), f"internal node {name!r} is registered on every streamz Stream"
