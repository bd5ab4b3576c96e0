"""Deploying models on a real Dask cluster: every worker serves them, workers that join
later too, broken models fail at deploy, and a new version replaces the old one with no
lost or mixed batches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from distributed import Worker
from distributed.utils_test import gen_cluster
from timing import scaled

import daskinfer
from daskinfer import OnnxModel, PythonModel
from daskinfer.exceptions import ModelLoadError, ModelNotFoundError
from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly


def predict_on_worker(name, x):
    from daskinfer.models.registry import registry_for

    return registry_for().get(name).predict(x)


def worker_models(dask_worker):
    from daskinfer.models.registry import registry_for

    return registry_for(dask_worker).names()


def test_deployed_onnx_model_runs_in_a_dask_task(client, mlp_deployed, mlp_path):
    assert daskinfer.deployed_models(client) == {"mlp": ["1"]}
    assert client.run(worker_models) == {w: {"mlp": "1"} for w in client.scheduler_info()["workers"]}
    xs = [random_rows(n, seed=n) for n in (1, 10, 500)]
    workers = list(client.scheduler_info()["workers"])
    for i, x in enumerate(xs):
        out = client.submit(predict_on_worker, "mlp", x, workers=[workers[i % 2]], pure=False).result()
        np.testing.assert_allclose(
            out["probabilities"], run_onnx_directly(mlp_path, {"x": x})["probabilities"], rtol=1e-6, atol=1e-7
        )


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2, timeout=scaled(60))
async def test_worker_that_joins_later_serves_the_model(c, s, a, b):
    """(Its own in-process cluster: a third worker joins it.)"""
    mlp_path = bundled_model_path()
    await daskinfer.deploy(c, OnnxModel("mlp", mlp_path))
    async with Worker(s.address, nthreads=1) as new:
        await c.wait_for_workers(3)
        x = random_rows(33, seed=5)
        out = await c.submit(predict_on_worker, "mlp", x, workers=[new.address], allow_other_workers=False, pure=False)
        np.testing.assert_allclose(
            out["probabilities"], run_onnx_directly(mlp_path, {"x": x})["probabilities"], rtol=1e-6, atol=1e-7
        )
        assert await c.run(worker_models, workers=[new.address]) == {new.address: {"mlp": "1"}}


def test_broken_model_fails_at_deploy_naming_the_file_and_leaves_nothing(client, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 20)
    model = OnnxModel("broken", path)
    with pytest.raises(ModelLoadError, match="cannot be loaded by onnxruntime") as info:
        daskinfer.deploy(client, model)
    assert str(path) in str(info.value)
    assert "broken" not in daskinfer.deployed_models(client)
    assert all("broken" not in names for names in client.run(worker_models).values())


def test_broken_model_without_client_validation_fails_on_the_workers_and_leaves_nothing(client, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not onnx at all" * 20)
    with pytest.raises(ModelLoadError, match="cannot be loaded by onnxruntime") as info:
        daskinfer.deploy(client, OnnxModel("broken", path), validate=False)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert "broken" not in daskinfer.deployed_models(client)
    assert all("broken" not in names for names in client.run(worker_models).values())
    plugins = client.run(lambda dask_worker: [n for n in dask_worker.plugins if "broken" in n])
    assert all(p == [] for p in plugins.values())


def test_a_python_model_that_fails_on_its_sample_fails_at_deploy_and_leaves_nothing(client):
    model = PythonModel("divides-by-zero", lambda x: 1 / 0, sample=np.ones((2, 4), np.float32))
    with pytest.raises(
        ModelLoadError, match=r"model 'divides-by-zero' version '1' failed its warm-up batch: ZeroDivisionError"
    ):
        daskinfer.deploy(client, model)
    assert "divides-by-zero" not in daskinfer.deployed_models(client)
    assert all("divides-by-zero" not in names for names in client.run(worker_models).values())


def output_on_worker(name, x, dask_worker=None):
    from daskinfer.models.registry import registry_for

    return registry_for(dask_worker).get(name).predict(x)["output"].tolist()


def _sibling_code(root, offset: int):
    root.mkdir(parents=True)
    (root / "helpers.py").write_text(f"OFFSET = {offset}\n")
    (root / "handler.py").write_text("from helpers import OFFSET\n\ndef predict(x):\n    return x + OFFSET\n")
    return root


def test_a_new_version_of_a_directory_model_runs_its_own_sibling_modules_on_the_workers(client, tmp_path):
    x = np.zeros((2, 3))
    daskinfer.deploy(client, PythonModel("sibs", directory=_sibling_code(tmp_path / "v1", 100), module="handler"))
    try:
        assert list(client.run(output_on_worker, "sibs", x).values()) == [[[100.0] * 3] * 2] * 2
        daskinfer.deploy(
            client, PythonModel("sibs", directory=_sibling_code(tmp_path / "v2", 200), module="handler", version=2)
        )
        assert list(client.run(output_on_worker, "sibs", x).values()) == [[[200.0] * 3] * 2] * 2
    finally:
        daskinfer.undeploy(client, "sibs")


class Constant:
    """A model that answers every row with ``value``: which version ran is visible in the output."""

    def __init__(self, value):
        self.value = value

    def predict(self, x):
        return np.full(len(x), self.value, dtype=np.float64)


def run_batch(name, x):
    from distributed import get_worker

    from daskinfer.models.registry import registry_for

    started = time.time()
    out = registry_for().get(name).predict(x)["output"]
    return get_worker().address, started, out


def test_new_version_replaces_old_with_no_lost_or_mixed_batches(client, poll):
    daskinfer.deploy(client, PythonModel("swap", Constant(1.0), version=1))
    try:
        results = []  # (submitted at, (worker, started at, outputs))
        errors = []
        submitted = 0
        stop = threading.Event()

        def producer():
            nonlocal submitted
            i = 0
            try:
                while not stop.is_set():
                    xs = [np.ones((8 + (i + k) % 5, 3)) for k in range(4)]
                    t = time.time()
                    futures = client.map(run_batch, ["swap"] * len(xs), xs, pure=False)
                    submitted += len(xs)
                    for x, r in zip(xs, client.gather(futures)):
                        results.append((t, len(x), r))
                    i += len(xs)
            except BaseException as e:  # noqa: BLE001 - reported by the test below
                errors.append(e)

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        poll(lambda: len(results) >= 20 or errors, what="batches on version 1")
        daskinfer.deploy(client, PythonModel("swap", Constant(2.0), version=2))
        swapped_at = time.time()
        poll(lambda: sum(t > swapped_at for t, _, _ in results) >= 20 or errors, what="batches after the swap")
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert not errors, errors

        assert len(results) == submitted  # no batch lost
        for _, rows, (_, _, out) in results:
            assert len(out) == rows
            assert np.all(out == 1.0) or np.all(out == 2.0), out  # never mixed
        values = [out[0] for _, _, (_, _, out) in results]
        assert 1.0 in values and 2.0 in values
        # after the swap completed, every new batch runs on version 2
        assert all(out[0] == 2.0 for t, _, (_, _, out) in results if t > swapped_at)
        # and no worker goes back to version 1 once it switched
        by_worker = {}
        for _, _, (worker, started, out) in results:
            by_worker.setdefault(worker, []).append((started, out[0]))
        for runs in by_worker.values():
            versions = [v for _, v in sorted(runs)]
            assert versions == sorted(versions)
        assert daskinfer.deployed_models(client) == {"swap": ["2"]}
        assert set(map(str, client.run(worker_models).values())) == {str({"swap": "2"})}
    finally:
        if "swap" in daskinfer.deployed_models(client):
            daskinfer.undeploy(client, "swap")


def test_undeploy_removes_the_model_everywhere(client, mlp_deployed):
    daskinfer.deploy(client, PythonModel("temp", Constant(5.0)))
    assert client.submit(predict_on_worker, "temp", np.ones((2, 1)), pure=False).result()["output"].tolist() == [
        5.0,
        5.0,
    ]
    assert daskinfer.undeploy(client, "temp") == ["1"]
    assert "temp" not in daskinfer.deployed_models(client)
    assert all(names == {"mlp": "1"} for names in client.run(worker_models).values())
    with pytest.raises(
        ModelNotFoundError, match=r"model 'temp' is not deployed here; deployed models: \['mlp'\]"
    ) as info:
        client.submit(predict_on_worker, "temp", np.ones((2, 1)), pure=False).result()
    assert info.value.model == "temp" and info.value.available == ["mlp"]


def test_undeploy_unknown_model_raises_key_error(client):
    with pytest.raises(KeyError, match="model 'never-deployed' is not deployed"):
        daskinfer.undeploy(client, "never-deployed")
