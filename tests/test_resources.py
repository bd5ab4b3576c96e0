"""Models placed by Dask worker resources, on a cluster of ``dask scheduler`` + ``dask worker``
processes: one worker without resources, one started with ``--resources GPU=1``.

There is no GPU here: the ``GPU`` resource is what a worker declares, as on a GPU machine; the
models run on onnxruntime's CPU provider (the real list of providers of this install).
"""

from __future__ import annotations

import os
import urllib.request

import numpy as np
import pytest
from dask_processes import DaskProcesses
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from daskinfer import (
    InferenceClient,
    OnnxModel,
    Pipeline,
    PythonModel,
    deploy,
    deploy_pipeline,
    deployed_models,
    pipelines,
    undeploy,
)
from daskinfer.cli.app import Deployment, load_app
from daskinfer.exceptions import ModelLoadError
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """``(client, procs, cpu_worker, gpu_worker)``: a scheduler and two worker processes."""
    procs = DaskProcesses(tmp_path_factory.mktemp("gpu-cluster"))
    procs.env["PYTHONPATH"] = TESTS  # gpu_models for the workers
    procs.scheduler()
    procs.worker("cpu-1")
    procs.worker("gpu-1", True, "--resources", "GPU=1")
    try:
        with Client(procs.address) as client:
            client.wait_for_workers(2, timeout=60)
            by_name = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            yield client, procs, by_name["cpu-1"], by_name["gpu-1"]
    finally:
        procs.stop()


def _gpu_workers(client: Client) -> set[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1}


def _holders(client: Client, name: str) -> set[str]:
    import gpu_models

    return {a for a, names in client.run(gpu_models.loaded_models).items() if name in names}


def _scrape(client: Client, worker: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    port = client.scheduler_info(n_workers=-1)["workers"][worker]["services"]["dashboard"]
    host = worker.split("://", 1)[1].rsplit(":", 1)[0]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_a_gpu_model_is_on_the_gpu_worker_only_its_partitions_run_there_and_a_gpu_worker_that_joins_takes_a_share(
    gpu_cluster, mlp_path, poll
):
    client, procs, cpu, gpu = gpu_cluster
    deploy(client, OnnxModel("gpu-mlp", mlp_path, resources={"GPU": 1}))
    try:
        assert _holders(client, "gpu-mlp") == {gpu}, "loaded on the worker with GPU=1 only"
        # named by string: its resources come from what deploy recorded, resolved on this client
        handle = deploy_pipeline(client, Pipeline(model="gpu-mlp", inbox="gpu-requests", partitions=4))
        assert handle.spec.resources == {"GPU": 1.0}
        status = handle.status()
        assert set(status["assigned"].values()) == {gpu}, status["assigned"]
        assert status["resources"] == {"GPU": 1.0} and status["waiting_for"] is None
        models = {r["partition"]: r["models"]["gpu-mlp"] for r in status["runners"]}
        assert len(models) == 4
        for m in models.values():  # the provider in use, as onnxruntime says (this machine has no GPU)
            assert m["provider"] == "CPUExecutionProvider" and list(m["providers"]) == ["CPUExecutionProvider"], m
            assert m["device"] == "cpu" and m["device_memory"] is None, m
        info = [labels for labels, v in _scrape(client, gpu)["daskinfer_model_info"] if labels["model"] == "gpu-mlp"]
        assert [(i["provider"], i["device"]) for i in info] == [("CPUExecutionProvider", "cpu")], info

        rows = random_rows(64, seed=3)
        expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        with InferenceClient(client, inbox="gpu-requests") as ic:
            got = [ic.submit({"x": rows[i]}, key=f"k{i}").result(60) for i in range(len(rows))]
            np.testing.assert_allclose(np.stack([r.value() for r in got]), expected, rtol=1e-5, atol=1e-6)

            # a second GPU worker joins: it loads the model and takes its share of the partitions
            procs.worker("gpu-2", True, "--resources", "GPU=1")
            client.wait_for_workers(3, timeout=60)
            (gpu2,) = _gpu_workers(client) - {gpu}
            poll(lambda: gpu2 in _holders(client, "gpu-mlp"), timeout=60, what="the model on the new GPU worker")

            def shared() -> bool:
                owners = list(handle.status()["assigned"].values())
                return sorted(owners) == sorted([gpu, gpu, gpu2, gpu2])

            poll(shared, timeout=90, interval=0.2, what="two partitions on each GPU worker")
            assert cpu not in _holders(client, "gpu-mlp")
            got = [ic.submit({"x": rows[i]}, key=f"k{i}").result(60) for i in range(len(rows))]
            np.testing.assert_allclose(np.stack([r.value() for r in got]), expected, rtol=1e-5, atol=1e-6)
        handle.stop()
    finally:
        undeploy(client, "gpu-mlp")


def test_a_pipeline_whose_model_needs_a_resource_no_worker_has_waits_then_fails_at_the_deploy_timeout(
    gpu_cluster, poll
):
    import gpu_models

    client, _, _, _ = gpu_cluster
    sample = np.ones((1, 4), np.float32)
    deploy(client, PythonModel("tpu-double", gpu_models.double, resources={"TPU": 1}, sample=sample))
    try:
        assert _holders(client, "tpu-double") == set(), "no worker has TPU=1: loaded nowhere"
        pipe = Pipeline(model="tpu-double", inbox="tpu-requests", partitions=2)
        handle = deploy_pipeline(client, pipe, wait=False)
        poll(lambda: "no worker with TPU=1" in (handle.status()["waiting_for"] or ""), what="the status to say why")
        status = handle.status()
        assert status["assigned"] == {} and sorted(status["failures"]) == [0, 1]
        assert all("no worker with TPU=1" in why for why in status["failures"].values()), status["failures"]
        assert 'dask worker --resources "TPU=1"' in status["waiting_for"]
        handle.stop()

        with pytest.raises(TimeoutError, match=r"pipeline 'tpu-requests': no partition could start within 3s: "
                           r"no worker with TPU=1"):  # fmt: skip
            deploy_pipeline(client, pipe, timeout=3)
        assert "tpu-requests" not in pipelines(client), "stopped at the timeout"
    finally:
        undeploy(client, "tpu-double")


def test_resources_on_a_model_entry_of_a_deployment_file(gpu_cluster, tmp_path):
    client, _, cpu, _ = gpu_cluster
    path = tmp_path / "gpu.yaml"
    path.write_text(
        "models:\n"
        "  - {kind: onnx, name: yaml-gpu, path: bundled, resources: {GPU: 1}, max_batch_size: 8192}\n"
        "pipelines:\n"
        "  - {model: yaml-gpu, inbox: yaml-gpu-requests, partitions: 2}\n"
    )
    deployment = Deployment(client, load_app(str(path)))
    try:
        (handle,) = deployment.deploy()
        gpus = _gpu_workers(client)
        assert _holders(client, "yaml-gpu") == gpus and cpu not in gpus
        assert set(handle.status()["assigned"].values()) <= gpus
        assert handle.spec.resources == {"GPU": 1.0}
        # the model's max_batch_size (recorded at deploy) makes the pipeline's batches that large
        assert handle.spec.settings.max_batch_size == 8192 and handle.spec.settings.model_batch_size == 4096
    finally:
        deployment.teardown()
    assert "yaml-gpu" not in deployed_models(client)


def test_a_provider_missing_on_the_worker_fails_deploy_naming_it_and_the_available_ones(gpu_cluster, mlp_path):
    client, _, _, _ = gpu_cluster
    model = OnnxModel("cuda-mlp", mlp_path, resources={"GPU": 1})
    # as made by a client whose onnxruntime has CUDA (onnxruntime-gpu): the stand-in for the GPU itself
    model.providers, model.provider_options = ["CUDAExecutionProvider"], [{}]
    with pytest.raises(
        ModelLoadError,
        match=r"model 'cuda-mlp': execution providers \['CUDAExecutionProvider'\] are not available in onnxruntime "
        r"on .*; available: \[.*'CPUExecutionProvider'\]",
    ):
        deploy(client, model, validate=False)
    assert "cuda-mlp" not in deployed_models(client), "nothing left deployed"


def test_a_class_models_load_gets_the_device_its_worker_holds(gpu_cluster):
    import gpu_models

    client, _, cpu, gpu = gpu_cluster
    deploy(client, PythonModel("where", gpu_models.DeviceProbe, sample=np.ones((1, 2), np.float32)))
    try:
        devices = client.run(gpu_models.probe_device, "where", workers=[cpu, gpu])
        assert devices == {cpu: "cpu", gpu: "cuda:0"}, devices
    finally:
        undeploy(client, "where")


def test_an_infer_stage_max_batch_size_cuts_the_model_calls_and_the_outputs_equal_onnxruntime(gpu_cluster, mlp_path):
    import gpu_models

    client, _, _, _ = gpu_cluster
    model = PythonModel("sized-mlp", gpu_models.SizedMLP, sample=random_rows(1))
    pipe = Pipeline(inbox="sized-requests", partitions=1).infer(model, max_batch_size=100)
    handle = deploy_pipeline(client, pipe)
    try:
        rows = random_rows(1000, seed=5)
        with InferenceClient(client, inbox="sized-requests") as ic:
            out = ic.predict({"x": rows}, timeout=60)  # one request of 1000 rows: one batch
        assert out["call_rows"].max() == 100 and set(out["call_rows"].tolist()) == {100}, "ten calls of 100 rows"
        expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)
    finally:
        handle.stop()
        undeploy(client, "sized-mlp")
