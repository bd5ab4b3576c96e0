"""Misspelt keys under ``daskinfer:`` are named, with the key they may mean: an error at deploy and at
``daskinfer run``, a warning at import and at client creation, a list from ``daskinfer config check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import dask
import pytest

import daskinfer
from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.config_check import UnknownConfigWarning, unknown_keys
from daskinfer.exceptions import ConfigError

CLI = [sys.executable, "-m", "daskinfer.cli"]
TYPO = {"daskinfer.batching.max-batch-sise": 4096}
HINT = "unknown key daskinfer.batching.max-batch-sise (did you mean 'daskinfer.batching.max-batch-size'?)"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DASKINFER__")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_unknown_keys_are_named_with_the_closest_known_key():
    assert unknown_keys({"batching": {"max-batch-size": 1, "max_delay": "1ms"}}) == []  # "_" is "-", as in dask
    (leaf,) = unknown_keys({"batching": {"max-batch-sise": 1}})
    assert leaf.startswith(HINT) and "known keys under daskinfer.batching: max-batch-size, max-delay" in leaf
    (section,) = unknown_keys({"batchng": {"max-batch-size": 1}})
    assert "unknown key daskinfer.batchng (did you mean 'daskinfer.batching'?)" in section
    assert unknown_keys({"kafka": {"client-config": {"security.protocol": "SSL"}}}) == [], "a free-form mapping"
    assert unknown_keys({"batching": 5}) == ["daskinfer.batching must be a mapping of keys, got int"]
    (far,) = unknown_keys({"zzz": 1})
    assert "did you mean" not in far


def test_deploy_refuses_a_misspelt_key_and_deploys_nothing(client, mlp_path):
    inbox = f"typo-{uuid.uuid4().hex[:6]}"
    with dask.config.set(TYPO):
        with pytest.raises(ConfigError, match=f"deploy_pipeline '{inbox}': the Dask config: .*max-batch-sise"):
            deploy_pipeline(client, Pipeline(model="mlp", inbox=inbox))
        with pytest.raises(ConfigError, match=r"deploy 'typo-mlp': the Dask config: .*did you mean"):
            deploy(client, OnnxModel("typo-mlp", mlp_path))
    assert inbox not in daskinfer.pipelines(client) and "typo-mlp" not in daskinfer.deployed_models(client)


def test_making_a_client_warns_about_a_key_set_since_import(client):
    with dask.config.set({"daskinfer.client.max-pendng": 3}):
        with pytest.warns(UnknownConfigWarning, match=r"daskinfer.client.max-pendng \(did you mean"):
            InferenceClient(client, inbox="never-started")


def test_importing_daskinfer_warns_naming_the_file_and_the_variable(tmp_path):
    (tmp_path / "mine.yaml").write_text("daskinfer:\n  batching:\n    max-batch-sise: 4096\n")
    env = _env(DASK_CONFIG=str(tmp_path), DASK_DASKINFER__PIPELINE__PARTITONS="4")
    out = subprocess.run(
        [sys.executable, "-c", "import daskinfer"], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path / 'mine.yaml'}: {HINT}" in out.stderr, out.stderr
    assert "environment variable DASK_DASKINFER__PIPELINE__PARTITONS: unknown key daskinfer.pipeline.partitons" in (
        out.stderr
    )
    assert "(did you mean 'daskinfer.pipeline.partitions'?)" in out.stderr
    assert "UnknownConfigWarning" in out.stderr


def test_daskinfer_run_stops_at_once_on_a_misspelt_key_in_the_file(tmp_path):
    app = tmp_path / "app.yaml"
    app.write_text(
        "config: {daskinfer: {batching: {max-batch-sise: 4096}}}\n"
        "models: [{kind: onnx, name: mlp, path: bundled}]\n"
        "pipelines: [{model: mlp, inbox: requests}]\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([*CLI, "run", str(app)], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"daskinfer run: {app}: config: {HINT}" in out.stderr, out.stderr
    assert "scheduler" not in out.stdout, "no cluster was started"
    assert "Traceback" not in out.stderr
    print(f"\ndaskinfer run refused the file in {time.monotonic() - t0:.1f}s")


def test_config_check_lists_the_problems_and_exits_1(tmp_path):
    app = tmp_path / "app.yaml"
    app.write_text("config: {daskinfer: {batching: {max-batch-sise: 1}, gateway: {tmeout: 5s}}}\nmodels: []\n")
    out = subprocess.run([*CLI, "config", "check", str(app)], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{app}: config: {HINT}")
    assert "daskinfer.gateway.tmeout (did you mean 'daskinfer.gateway.timeout'?)" in lines[1]
    plain = tmp_path / "dask.yaml"
    plain.write_text("daskinfer:\n  batching:\n    max-batch-size: 1\ndistributed: {}\n")
    out = subprocess.run([*CLI, "config", "check", str(plain)], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0 and "no unknown keys" in out.stdout, out.stdout + out.stderr
    # no FILE: every Dask config file, and the environment
    env = _env(DASK_CONFIG=str(tmp_path), DASK_DASKINFER__REDIS__URLL="redis://x")
    (tmp_path / "app.yaml").unlink()
    (tmp_path / "typo.yaml").write_text("daskinfer: {onnx: {intra-op-threds: 1}}\n")
    out = subprocess.run([*CLI, "config", "check"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{tmp_path / 'typo.yaml'}: unknown key daskinfer.onnx.intra-op-threds" in out.stdout, out.stdout
    assert "environment variable DASK_DASKINFER__REDIS__URLL: unknown key daskinfer.redis.urll" in out.stdout
    missing = subprocess.run(
        [*CLI, "config", "check", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
