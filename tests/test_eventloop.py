"""The loop of the processes daskinfer owns follows Dask's ``distributed.admin.event-loop``."""

from __future__ import annotations

import asyncio
import sys

import dask.config
import numpy as np
import pytest
from cli_process import serving

from daskinfer import RemoteModel, eventloop
from daskinfer.exceptions import ConfigError
from daskinfer.testing import random_rows, run_onnx_directly


async def _loop_kind() -> str:
    return eventloop.loop_name()


@pytest.mark.parametrize(
    ("setting", "expected"), [("tornado", "asyncio"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
def test_run_uses_the_loop_dask_is_told_to_use(setting, expected):
    pytest.importorskip("uvloop")
    with dask.config.set({"distributed.admin.event-loop": setting}):
        assert eventloop.run(_loop_kind()) == expected


def test_an_unknown_loop_is_an_error_naming_the_key():
    with dask.config.set({"distributed.admin.event-loop": "trio"}):
        with pytest.raises(ConfigError, match=r"distributed.admin.event-loop is 'trio'; expected one of"):
            eventloop.run(_loop_kind())


def test_uvloop_asked_for_but_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # an import that fails, as where uvloop is not installed
    with dask.config.set({"distributed.admin.event-loop": "uvloop"}):
        with pytest.raises(ConfigError, match=r'pip install "daskinfer\[uvloop\]"'):
            eventloop.run(_loop_kind())


def test_a_model_server_on_uvloop_answers_grpc_and_rest_like_onnxruntime(mlp_path):
    """``daskinfer serve`` (and the gateway: the same front door) on uvloop: grpc.aio and aiohttp both
    run on it, and the answers are onnxruntime's."""
    pytest.importorskip("uvloop")
    import aiohttp

    log: list[str] = []
    args = ["serve", "--onnx", f"mlp={mlp_path}", "--grpc-port", "0", "--http-port", "0"]
    env = {"DASK_DISTRIBUTED__ADMIN__EVENT_LOOP": "uvloop"}
    with serving(args, "daskinfer model server", env=env, log=log) as (grpc_port, http_port):
        assert "event loop uvloop" in "".join(log)
        x = random_rows(8, seed=11)
        expected = run_onnx_directly(mlp_path, {"x": x})["probabilities"]
        loaded = RemoteModel("mlp", f"127.0.0.1:{grpc_port}").load()
        try:
            np.testing.assert_array_equal(loaded.predict(x)["probabilities"], expected)
        finally:
            loaded.close()

        async def rest() -> dict:
            body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{http_port}/v2/models/mlp/infer", json=body) as r:
                    assert r.status == 200, await r.text()
                    return await r.json()

        out = {o["name"]: o for o in asyncio.run(rest())["outputs"]}
        got = np.asarray(out["probabilities"]["data"], dtype=np.float32).reshape(out["probabilities"]["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-6)
