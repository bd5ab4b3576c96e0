"""What a new user meets in the first hour (issue 20): each of these failed before its fix.

Real processes: ``daskinfer`` and ``dask`` commands in child processes, the session LocalCluster,
a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest
from cli_process import serving
from redis_server import RedisServer, free_port

from daskinfer import InferenceClient, Pipeline, deploy_pipeline
from daskinfer.exceptions import InputValidationError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "daskinfer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.timeout(180)


def test_the_notebooks_extra_can_execute_notebooks_with_nbconvert():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # (tomllib is Python 3.11+; the project runs on 3.10)
        (line,) = [ln for ln in f if ln.startswith("notebooks = [")]
    assert re.search(r'"nbconvert\b', line), line


def test_serve_takes_a_bare_onnx_path_as_predict_does(mlp_path):
    with serving(["serve", "--onnx", mlp_path, "--grpc-port", "0", "--http-port", "0"], "daskinfer model server") as (
        _,
        http_port,
    ):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/mlp", timeout=30) as r:
            assert json.loads(r.read())["name"] == "mlp", "named after the file, as predict --model names it"


def test_dask_help_shows_no_rst_markup():
    out = subprocess.run([sys.executable, "-m", "dask", "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("infer ")]
    assert "``" not in line and "model inference" in line and "..." not in line, line


def _workers_starting(pid: int) -> bool:
    """Whether ``daskinfer run`` (pid) has started a process of its cluster (not counting a ``sleep``)."""
    try:
        return any(c.name() != "sleep" for c in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("after", [0.0, 0.4, 1.2], ids=lambda s: f"{s}s-after-the-first-worker-process")
def test_ctrl_c_while_run_starts_its_cluster_stops_with_one_line(after, poll):
    proc = subprocess.Popen(
        [*CLI, "run", os.path.join(ROOT, "conf", "local.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        poll(lambda: _workers_starting(proc.pid), timeout=60, what="daskinfer run to start its cluster's processes")
        if after:
            deadline = time.monotonic() + after  # a point within the start, not a wait for a result
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Fatal Python error" not in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "stopped" in out, out


def test_run_prints_the_pipelines_page_and_it_answers(poll):
    proc = subprocess.Popen(
        [*CLI, "run", os.path.join(ROOT, "conf", "local.yaml"), "--report-interval", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        poll(
            lambda: any("pipelines page:" in ln for ln in lines) or proc.poll() is not None,
            timeout=120,
            what="the pipelines page line",
        )
        m = re.search(r"pipelines page: (http://\S+/daskinfer)\n", "".join(lines))
        assert m, "".join(lines)
        with urllib.request.urlopen(m.group(1), timeout=30) as r:
            page = r.read().decode()
        assert r.status == 200 and "requests" in page and "scores" in page, page[:500]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        reader.join(10)


def test_gateway_fails_at_once_naming_a_scheduler_that_is_not_there():
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = subprocess.run(
        [*CLI, "gateway", "--scheduler", address, "--pipeline", "m=requests", "--http-port", "0", "--grpc-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"daskinfer gateway: cannot reach the Dask scheduler at {address}" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert took < 20, f"took {took:.1f}s (Dask's connect timeout is 30s)"


def test_predict_says_at_once_that_the_data_is_missing(tmp_path, mlp_path, capsys):
    from daskinfer.cli.main import main

    t0 = time.monotonic()
    status = main(["predict", str(tmp_path / "nope.parquet"), "--model", mlp_path, "--out", str(tmp_path / "out")])
    took = time.monotonic() - t0
    assert status == 2
    assert f"no such file or directory: {tmp_path / 'nope.parquet'}" in capsys.readouterr().err
    assert took < 3, f"took {took:.1f}s: it started a cluster first"


def test_an_empty_block_is_refused_at_the_client_in_plain_words(client, mlp_deployed):
    handle = deploy_pipeline(client, Pipeline(model=mlp_deployed, inbox=f"empty-{os.getpid()}", partitions=1))
    try:
        with InferenceClient(client, inbox=handle.inbox) as ic:
            with pytest.raises(InputValidationError, match=r"a block needs at least one row; input 'x' has 0 rows"):
                ic.predict({"x": np.zeros((0, 16), np.float32)})
            with pytest.raises(InputValidationError, match="a request needs at least one input"):
                ic.submit({})
            assert ic.predict({"x": np.zeros((1, 16), np.float32)}).shape == (1, 2), "the client goes on"
    finally:
        handle.stop()


def test_redis_recovery_logs_a_reconnected_line(tmp_path, caplog):
    redis = pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    assert redis
    from daskinfer.connectors.redis.link import RedisLink

    server = RedisServer(str(tmp_path), appendonly=False)
    server.start()

    async def scenario() -> None:
        link = RedisLink(server.url, {"reconnect_base": 0.02, "reconnect_max": 0.2}, "test link")
        try:
            assert await link.retry("ping", link.redis.ping)
            server.stop()
            call = asyncio.ensure_future(link.retry("ping", link.redis.ping))
            while not any("lost Redis" in r.getMessage() for r in caplog.records):
                assert not call.done(), call
                await asyncio.sleep(0.01)
            server.start()
            assert await asyncio.wait_for(call, 30)
        finally:
            await link.aclose()

    try:
        with caplog.at_level(logging.WARNING, logger="daskinfer.connectors.redis.link"):
            asyncio.run(scenario())
    finally:
        server.stop()
    back = [r for r in caplog.records if "reconnected to Redis at" in r.getMessage()]
    assert back and back[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert f"127.0.0.1:{server.port}" in back[0].getMessage()
