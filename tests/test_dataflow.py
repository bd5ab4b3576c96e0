"""User-composed pipelines: the same stages in-process and deployed as partitions.

pre-processing -> model -> in-between step -> second model -> post-processing gives what the
same steps computed directly give; a canary route splits traffic by weight; shadow results are
recorded and not returned; an exception in a user stage fails only the requests of that call.
"""

from __future__ import annotations

import collections
import uuid

import numpy as np
import pytest

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline, undeploy
from daskinfer.connectors.embedded import BrokerRPC
from daskinfer.exceptions import ConfigError, ResultError
from daskinfer.models.registry import ModelRegistry
from daskinfer.testing import make_mlp_onnx, random_rows, run_onnx_directly
from daskinfer.wire.result_frames import decode_results

MEAN, STD = 0.25, 1.5


def _scale(cols):
    return {"x": (cols["x"] - MEAN) / STD}


def _between(cols):
    return {"h": cols["probabilities"] * 2.0}


def _label(cols):
    p = cols["probabilities"]
    return {"label": p.argmax(axis=1), "score": p.max(axis=1)}


@pytest.fixture(scope="module")
def second_model_bytes():
    return make_mlp_onnx(n_in=2, hidden=8, n_out=3, seed=1)


@pytest.fixture(scope="module")
def two_models(client, mlp_path, second_model_bytes):
    deploy(client, OnnxModel("flow-a", mlp_path))
    deploy(client, OnnxModel("flow-b", second_model_bytes))
    yield "flow-a", "flow-b"
    undeploy(client, "flow-a")
    undeploy(client, "flow-b")


def _cascade(a, b) -> Pipeline:
    return (
        Pipeline(inbox=f"flow-{uuid.uuid4().hex[:8]}")
        .map_batches(_scale)
        .infer(a)
        .map_batches(_between)
        .infer(b, inputs={"x": "h"})
        .map_batches(_label)
    )


def _direct(rows, mlp_path, second_model_bytes):
    """The same steps, computed directly with onnxruntime."""
    p1 = run_onnx_directly(mlp_path, {"x": ((rows - MEAN) / STD).astype(np.float32)})["probabilities"]
    p2 = run_onnx_directly(second_model_bytes, {"x": (p1 * 2.0).astype(np.float32)})["probabilities"]
    return p2.argmax(axis=1), p2.max(axis=1)


def test_a_cascade_in_process_equals_the_steps_computed_directly(mlp_path, second_model_bytes):
    rows = random_rows(500, seed=11)
    registry = ModelRegistry()
    pipe = _cascade(OnnxModel("flow-a", mlp_path), OnnxModel("flow-b", second_model_bytes))
    out = pipe.run({"x": rows}, registry=registry)
    label, score = _direct(rows, mlp_path, second_model_bytes)
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_allclose(out["score"], score, rtol=1e-5, atol=1e-6)
    assert set(out) == {"label", "score"}, "the answer is what the last stage produced"


def test_a_cascade_on_a_plain_streamz_stream(mlp_path, second_model_bytes):
    import asyncio

    from streamz import Stream

    rows = random_rows(64, seed=12)
    registry = ModelRegistry()
    pipe = _cascade(OnnxModel("flow-a", mlp_path), OnnxModel("flow-b", second_model_bytes))

    async def run():
        source = Stream(asynchronous=True)
        out = source.run_pipeline(pipe, registry=registry).sink_to_list()
        for block in np.split(rows, 4):
            await source.emit({"x": block})
        return out

    out = asyncio.run(run())
    label, _ = _direct(rows, mlp_path, second_model_bytes)
    np.testing.assert_array_equal(np.concatenate([o["label"] for o in out]), label)


def test_a_cascade_deployed_on_two_workers_equals_the_steps_computed_directly(
    client, two_models, mlp_path, second_model_bytes
):
    pipe = _cascade(*two_models)
    handle = deploy_pipeline(client, pipe)
    rows = random_rows(3000, seed=13)
    try:
        with InferenceClient(client, inbox=pipe.inbox) as ic:
            singles = [ic.submit({"x": r}) for r in rows[:2000]]
            block = ic.predict({"x": rows[2000:]})
            results = [f.result(60) for f in singles]
    finally:
        handle.stop()
    label, score = _direct(rows, mlp_path, second_model_bytes)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    np.testing.assert_array_equal([r.outputs["label"] for r in results], label[:2000])
    np.testing.assert_allclose([r.outputs["score"] for r in results], score[:2000], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(block["label"], label[2000:])
    assert len(handle.status()["runners"]) == 0, "a stopped pipeline reports no partitions"


def test_a_canary_at_10_percent_gets_10_percent_and_every_request_is_answered_once(client, mlp_path):
    deploy(client, OnnxModel("stable-m", mlp_path))
    deploy(client, OnnxModel("canary-m", mlp_path, version="2"))
    pipe = Pipeline(model="stable-m", inbox=f"canary-{uuid.uuid4().hex[:8]}", partitions=2).canary("canary-m", 0.1)
    handle = deploy_pipeline(client, pipe)
    n = 30_000  # the share is within 0.1 +- 0.01 unless 5.8 standard deviations off (random draws)
    rows = random_rows(1000, seed=14)
    try:
        with InferenceClient(client, inbox=pipe.inbox) as ic:
            ids = [ic.send(rows[i % 1000]) for i in range(n)]
            got = {}
            for r in ic.results(timeout=30):
                assert r.id not in got, "delivered twice"
                got[r.id] = r
                if len(got) == n:
                    break
            assert ic.duplicates == 0
    finally:
        handle.stop()
        undeploy(client, "stable-m")
        undeploy(client, "canary-m")
    assert set(got) == set(ids), "every request answered"
    by_model = collections.Counter(r.model for r in got.values())
    share = by_model["canary-m"] / n
    print(f"\ncanary share: {share:.4f} of {n} ({dict(by_model)})")
    assert 0.09 <= share <= 0.11
    assert by_model["stable-m"] + by_model["canary-m"] == n
    assert {r.version for r in got.values() if r.model == "canary-m"} == {"2"}


def test_shadow_results_are_recorded_and_not_returned(client, mlp_path, second_model_bytes, poll):
    deploy(client, OnnxModel("live-m", mlp_path))
    deploy(client, OnnxModel("shadow-m", mlp_path, version="9"))
    inbox = f"shadow-{uuid.uuid4().hex[:8]}"
    topic = f"{inbox}-recorded"
    pipe = Pipeline(model="live-m", inbox=inbox, partitions=1).shadow("shadow-m", topic=topic).infer("live-m")
    handle = deploy_pipeline(client, pipe)
    rows = random_rows(300, seed=15)

    def read_recorded() -> list:
        async def read():
            b = BrokerRPC(client.scheduler)
            return (await b.get(topic, 0, 0, 100_000))["messages"]

        return [r for data in client.sync(read) for r in decode_results(data).results()]

    try:
        with InferenceClient(client, inbox=inbox) as ic:
            results = [f.result(60) for f in [ic.submit({"x": r}) for r in rows]]
            recorded: list = []

            def all_recorded() -> bool:
                recorded[:] = read_recorded()
                return len(recorded) >= len(rows)

            poll(all_recorded, interval=0.05, what="a shadow result recorded for every request")
            # one more answer: whatever the pipeline sent this client for the requests before it is here by now
            assert ic.submit({"x": rows[0]}).result(60).ok
            returned = list(ic.results(timeout=0))
    finally:
        handle.stop()
        undeploy(client, "live-m")
        undeploy(client, "shadow-m")
    assert {r.model for r in results} == {"live-m"} and not returned, "callers get the live model's answers only"
    assert sorted(r.id for r in recorded) == sorted(r.id for r in results), "one shadow result per request"
    assert {(r.model, r.version) for r in recorded} == {("shadow-m", "9")}
    want = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
    by_id = {r.id: r for r in recorded}
    np.testing.assert_allclose([by_id[r.id].value() for r in results], want, rtol=1e-5, atol=1e-6)


def test_an_exception_in_a_user_stage_fails_only_the_requests_of_that_call(client, two_models, mlp_path):
    def picky(cols):
        if (cols["x"][:, 0] > 100).any():
            raise ValueError("feature 0 above 100")
        return cols

    pipe = (
        Pipeline(inbox=f"picky-{uuid.uuid4().hex[:8]}", partitions=1)
        .map_batches(picky, name="picky")
        .infer(two_models[0])
    )
    handle = deploy_pipeline(client, pipe)
    rows = random_rows(200, seed=16)
    bad = rows[:5].copy()
    bad[:, 0] = 1000
    try:
        with InferenceClient(client, inbox=pipe.inbox) as ic:
            failed = ic.submit_many({"x": bad}).result(30)  # one request, one call: it fails alone
            good = [f.result(30) for f in [ic.submit({"x": r}) for r in rows]]
            again = ic.submit_many({"x": bad}).result(30)
    finally:
        handle.stop()
    for r in (failed, again):
        assert not r.ok and r.error_type == "StageError"
        assert "map_batches 'picky'" in r.error and "ValueError: feature 0 above 100" in r.error, r.error
        with pytest.raises(ResultError, match="feature 0 above 100"):
            r.value()
    assert all(r.ok for r in good), "the pipeline goes on"
    np.testing.assert_allclose(
        [r.value() for r in good], run_onnx_directly(mlp_path, {"x": rows})["probabilities"], rtol=1e-5, atol=1e-6
    )


def test_a_filter_answers_the_rejected_requests_with_its_reason(mlp_path):
    rows = random_rows(20, seed=17)
    rows[3, :] = 0.0
    pipe = (
        Pipeline()
        .filter(lambda c: np.abs(c["x"]).sum(axis=1) > 0, reason="all-zero rows carry no signal", name="nonzero")
        .infer(OnnxModel("f-m", mlp_path))
    )
    out = pipe.run({"x": rows}, registry=ModelRegistry(), errors="return")
    assert out["error"][3] == "RequestRejected: rejected by filter 'nonzero': all-zero rows carry no signal"
    assert all(e is None for i, e in enumerate(out["error"]) if i != 3)
    with pytest.raises(ResultError, match="1 of 20 rows failed; row 3: RequestRejected"):
        pipe.run({"x": rows}, registry=ModelRegistry())


def test_an_ensemble_averages_its_members_by_default(mlp_path, second_model_bytes):
    rows = random_rows(50, seed=18)
    a = OnnxModel("e-a", mlp_path)
    b = OnnxModel("e-b", make_mlp_onnx(seed=7))
    out = Pipeline().ensemble([a, b]).run({"x": rows}, registry=ModelRegistry())
    want = (
        run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        + run_onnx_directly(make_mlp_onnx(seed=7), {"x": rows})["probabilities"]
    ) / 2
    np.testing.assert_allclose(out["probabilities"], want, rtol=1e-5, atol=1e-6)


def test_routing_by_key_sends_each_key_to_one_branch(mlp_path):
    from daskinfer.dataflow.stages import Route

    route = Route({"a": "m-a", "b": "m-b"}, weights={"a": 1, "b": 1}, by="key")
    from daskinfer.dataflow.batch import Origin, RequestBatch
    from daskinfer.dataflow.stages import StageContext

    keys = [f"user-{i % 50}" for i in range(1000)]
    n = len(keys)
    rb = RequestBatch(
        [str(i) for i in range(n)],
        {"x": np.zeros((n, 1))},
        None,
        np.zeros(n, bool),
        keys,
        None,
        np.full(n, np.nan),
        np.full(n, np.nan),
        np.zeros(n, np.int32),
        [Origin(None, True, 0.0)],
    )
    branch = route._draw(rb, StageContext(ModelRegistry()))
    per_key = collections.defaultdict(set)
    for k, b in zip(keys, branch.tolist()):
        per_key[k].add(b)
    assert all(len(v) == 1 for v in per_key.values()), "a key always goes to the same branch"
    assert len({next(iter(v)) for v in per_key.values()}) == 2, "keys spread over both branches"


def test_a_pipeline_without_stages_or_model_says_what_to_do():
    with pytest.raises(ConfigError, match=r"needs stages, or a model: Pipeline\(model='mlp'\)"):
        Pipeline(inbox="x").resolve()
    with pytest.raises(ConfigError, match="unknown stage kind 'mapp'"):
        Pipeline(stages=[{"mapp": "m:f"}]).resolve()
    with pytest.raises(ConfigError, match="expected a callable or 'module:function'"):
        Pipeline().map_batches("no_colon").resolve()


def test_a_stage_named_as_module_function_in_a_deployment_file_runs(client, two_models, mlp_path, tmp_path):
    from daskinfer.cli.app import deploy_app, load_app

    path = tmp_path / "app.yaml"
    inbox = f"yaml-{uuid.uuid4().hex[:8]}"
    path.write_text(f"""
pipelines:
  - inbox: {inbox}
    partitions: 1
    stages:
      - map_batches: daskinfer.testing:negate_columns
      - infer: {two_models[0]}
""")
    handles = deploy_app(client, load_app(str(path)))
    rows = random_rows(100, seed=19)
    try:
        with InferenceClient(client, inbox=inbox) as ic:
            got = ic.predict({"x": rows})
    finally:
        for h in handles:
            h.stop()
    np.testing.assert_allclose(got, run_onnx_directly(mlp_path, {"x": -rows})["probabilities"], rtol=1e-5, atol=1e-6)


def test_deploying_a_pipeline_whose_model_is_not_deployed_fails_at_once_naming_it(client):
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="model 'nowhere' is not deployed; deploy it first"):
        deploy_pipeline(client, Pipeline(model="nowhere", inbox=f"nowhere-{uuid.uuid4().hex[:6]}"))
    assert time.monotonic() - t0 < 30, "it fails at deploy, not after the partitions' model timeout (60 s)"


def test_an_output_the_model_does_not_have_fails_at_deploy(client, two_models):
    with pytest.raises(ConfigError, match="model 'flow-a' has no output 'prob'; its outputs are \\['probabilities'\\]"):
        deploy_pipeline(client, Pipeline(model=two_models[0], inbox=f"outs-{uuid.uuid4().hex[:6]}", outputs=["prob"]))


def test_run_works_where_an_event_loop_is_running_as_in_jupyter(mlp_path):
    import asyncio

    rows = random_rows(8, seed=20)
    pipe = Pipeline().infer(OnnxModel("j-m", mlp_path))

    async def cell():  # a notebook cell runs inside the kernel's event loop
        return pipe.run({"x": rows}, registry=ModelRegistry())

    out = asyncio.run(cell())
    np.testing.assert_allclose(
        out["probabilities"], run_onnx_directly(mlp_path, {"x": rows})["probabilities"], rtol=1e-5, atol=1e-6
    )
