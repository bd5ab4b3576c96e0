"""``daskinfer gateway --workers N``: several gateway processes on one port (SO_REUSEPORT)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from server_process import free_port

from daskinfer import Pipeline, deploy_pipeline
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _infer(url: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _ready(url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def test_two_gateway_processes_share_a_port_and_one_dying_leaves_the_other_serving(client, mlp_deployed, mlp_path):
    handle = deploy_pipeline(client, Pipeline(model=mlp_deployed, inbox="gateway-workers", partitions=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "daskinfer.cli", "gateway", "--scheduler", client.scheduler.address,
        "--pipeline", "mlp=gateway-workers", "--http-port", str(port), "--no-grpc", "--workers", "2",
        "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _ready(f"{url}", time.monotonic() + 90), "the gateway processes did not become ready"
        deadline = time.monotonic() + 90
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = _children(proc.pid)
        assert len(kids) == 2, f"gateway processes: {kids}"
        infer = f"{url}/v2/models/mlp/infer"
        rows = random_rows(40, seed=8)
        want = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        for i in range(20):
            np.testing.assert_allclose(_infer(infer, rows[i : i + 1]), want[i : i + 1], rtol=1e-5, atol=1e-6)
        os.kill(kids[0], signal.SIGKILL)
        answered = 0
        deadline = time.monotonic() + 60
        while answered < 20 and time.monotonic() < deadline:  # the other process serves on the same port
            try:
                got = _infer(infer, rows[20 + answered : 21 + answered])
            except (urllib.error.URLError, ConnectionError):
                continue  # a connection the kernel gave the dead process before it went away
            np.testing.assert_allclose(got, want[20 + answered : 21 + answered], rtol=1e-5, atol=1e-6)
            answered += 1
        assert answered == 20, "the surviving gateway process stopped answering"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        handle.stop()
    assert _children(proc.pid) == []


def test_workers_on_a_port_in_use_fail_naming_it(client):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "daskinfer.cli",
                "gateway",
                "--scheduler",
                client.scheduler.address,
                "--pipeline",
                "mlp=x",
                "--http-port",
                str(port),
                "--no-grpc",
                "--workers",
                "2",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert f"cannot bind the REST front end to 127.0.0.1:{port}: the port is in use" in out.stderr, out.stderr


def test_a_port_whose_server_just_closed_its_connections_counts_as_free():
    """A server that closed its connections leaves them in TIME_WAIT for a minute; the gateway binds
    such a port (SO_REUSEADDR, as aiohttp and grpc do), so ``--workers`` must not refuse it."""
    from daskinfer.cli.workers import _check_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway's servers bind
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as caller:
            conn, _ = server.accept()
            conn.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
            caller.recv(1)
    assert _check_free("127.0.0.1", port, "REST") is None
