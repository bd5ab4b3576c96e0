"""Deployment files (`daskinfer run`), the CLI and the worker/scheduler preload."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from distributed import Client, LocalCluster
from timing import scaled

from daskinfer import InferenceClient, undeploy
from daskinfer.cli.app import build_model, deploy_app, flat_config, load_app
from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.testing import random_rows, run_onnx_directly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, words",
    [
        ("models: [\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("modles: []\n", "unknown keys ['modles']"),
        ("models: {a: 1}\n", "'models' must be a list"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_app(path)
    assert path in str(e.value) and words in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read deployment file '/no/such.yaml'"):
        load_app("/no/such.yaml")


def test_bad_entries_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"f.yaml: models\[0\]: unknown model kind 'tensorflow'"):
        build_model({"kind": "tensorflow", "name": "m"}, str(tmp_path), "f.yaml: models[0]")
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_model({"kind": "onnx", "path": "bundled"}, str(tmp_path), "here")
    with pytest.raises(ModelLoadError, match="broken.onnx"):
        (tmp_path / "broken.onnx").write_bytes(b"not onnx")
        build_model({"kind": "onnx", "name": "m", "path": "broken.onnx"}, str(tmp_path), "here").validate()
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_model({"kind": "onnx", "name": "m", "path": "bundled", "colour": "red"}, str(tmp_path), "here")


def test_flat_config():
    assert flat_config({"daskinfer": {"batching": {"max-batch-size": 8}, "x": 1}}) == {
        "daskinfer.batching.max-batch-size": 8,
        "daskinfer.x": 1,
    }


def test_deploy_app_serves_requests(client, tmp_path, mlp_path):
    inbox = f"app-{uuid.uuid4().hex[:6]}"
    path = _write(
        tmp_path,
        f"""
models:
  - {{kind: onnx, name: app-mlp, path: {mlp_path}}}
pipelines:
  - {{model: app-mlp, inbox: {inbox}, partitions: 2}}
""",
    )
    handles = deploy_app(client, load_app(path))
    try:
        rows = random_rows(50, seed=9)
        with InferenceClient(client, inbox=inbox) as ic:
            got = ic.predict(rows)
        np.testing.assert_allclose(got, run_onnx_directly(mlp_path, {"x": rows})["probabilities"], rtol=1e-5, atol=1e-6)
    finally:
        for h in handles:
            h.stop()
        undeploy(client, "app-mlp")


@pytest.mark.slow  # daskinfer run starts a LocalCluster of worker processes
def test_cli_run_and_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "daskinfer.cli", "run", os.path.join(ROOT, "conf", "local.yaml"), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=scaled(240),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 pipeline(s) running" in proc.stdout and "inbox 'requests'" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "daskinfer.cli", "run", "/no/such.yaml"],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 2 and "cannot read deployment file" in proc.stderr


def test_preload_installs_broker_and_runner_handlers():
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        dashboard_address=":0",
        scheduler_kwargs={"preload": ["daskinfer.preload"]},
        preload=["daskinfer.preload"],
    ) as cluster:
        with Client(cluster) as client:
            assert "daskinfer_put" in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.handlers))
            handlers = client.run(lambda dask_worker: "daskinfer_runner_start" in dask_worker.handlers)
            assert list(handlers.values()) == [True]
