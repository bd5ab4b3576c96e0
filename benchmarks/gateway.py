"""The gateway in front of a pipeline vs a FastAPI + uvicorn + onnxruntime per-request server.

The same model (the bundled MLP 16->64->64->2) and the same v2 REST requests, sent by a
load generator in its own process (``_loadgen.py``, aiohttp client) to

(a) ``daskinfer gateway`` (its own process) in front of a pipeline on a ``dask
    scheduler`` and two one-thread ``dask worker`` processes;
(b) ``fastapi_server.py`` under uvicorn (its own process): one onnxruntime call per
    HTTP request, the way such a server is usually written.

For each: a closed loop with 64 connections (peak req/s), then open loops at 10% and 50%
of that peak (p99 latency from each request's scheduled time).  Then (a) again with
binary-tensor requests (Triton's extension) of 64 rows each, then the gateway's peak on
uvloop (``distributed.admin.event-loop``) and as two processes on one port (``--workers 2``), then its
gRPC front end (``_grpc_loadgen.py``, one channel, 64 one-row requests in flight): unary
``ModelInfer`` calls vs one ``ModelStreamInfer`` stream.  Everything shares this
machine's cores, so read the ratios, measured side by side in one run.  The last line
printed is one JSON object.

    python benchmarks/gateway.py --quick
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import free_port, process_cluster  # noqa: E402

from daskinfer import OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.remote import v2  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows, run_onnx_directly  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONWARNINGS="ignore")
BLOCK_ROWS = 64


def json_bodies(n: int, rows: int = 1) -> list[dict]:
    out = []
    for i in range(n):
        x = random_rows(rows, seed=i)
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        out.append({"body": base64.b64encode(body).decode(), "headers": {"Content-Type": "application/json"}})
    return out


def binary_bodies(n: int, rows: int) -> list[dict]:
    out = []
    for i in range(n):
        x = random_rows(rows, seed=i)
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        out.append(
            {
                "body": base64.b64encode(head + x.tobytes()).decode(),
                "headers": {"Content-Type": "application/octet-stream", v2.INFERENCE_HEADER: str(len(head))},
            }
        )
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60, log: Any = None) -> None:
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            said = ""
            if log is not None:
                log.seek(0)
                said = ": " + log.read().decode(errors="replace")[-1500:]
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}{said}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.1)


@contextlib.contextmanager
def started(cmd: list[str], url: str, env: dict | None = None) -> Iterator[None]:
    log = tempfile.TemporaryFile()  # what the server says, shown if it does not start
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env or ENV, cwd=HERE)
    try:
        wait_ready(url, proc, log=log)
        yield
    finally:
        log.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_generator(script: str, args: list[str], duration: float, what: str) -> dict:
    """``script`` (a load generator of this folder) in its own process; its last line, as JSON."""
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load(url: str, bodies_file: str, mode: str, duration: float, rate: float = 0.0, concurrency: int = 64) -> dict:
    args = [url, bodies_file, "--mode", mode, "--concurrency", str(concurrency), "--rate", str(max(rate, 1.0))]
    return run_generator("_loadgen.py", args, duration, "load generator")


def check_answer(url: str, rows: int) -> None:
    """One request by hand: the server answers what onnxruntime computes."""
    x = random_rows(rows, seed=99)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, run_onnx_directly(bundled_model_path(), {"x": x})["probabilities"], rtol=1e-5)


def measure(name: str, url: str, bodies_file: str, duration: float) -> dict:
    peak = load(url, bodies_file, "closed", duration)
    figures = {"peak": peak}
    for pct in (10, 50):
        figures[f"open_{pct}pct"] = load(url, bodies_file, "open", duration, rate=peak["req_s"] * pct / 100)
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def on_http_port(cmd: list[str], port: int) -> list[str]:
    """``cmd`` with its ``--http-port`` value replaced by ``port``."""
    i = cmd.index("--http-port") + 1
    return [*cmd[:i], str(port), *cmd[i + 1 :]]


def grpc_load(address: str, mode: str, duration: float, concurrency: int = 64) -> dict:
    """``_grpc_loadgen.py`` in its own process: ``mode`` "unary" (ModelInfer calls) or "stream" (ModelStreamInfer)."""
    args = [address, "mlp", "--mode", mode, "--concurrency", str(concurrency)]
    return run_generator("_grpc_loadgen.py", args, duration, "gRPC load generator")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (under 90 s in all)")
    p.add_argument("--duration", type=float, default=None, help="seconds per load run (default 10; --quick 3)")
    args = p.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 10.0)
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, bodies in (("single", json_bodies(256)), ("blocks", binary_bodies(64, BLOCK_ROWS))):
            files[key] = os.path.join(tmp, f"{key}.json")
            with open(files[key], "w") as f:
                json.dump(bodies, f)

        results = {}
        with process_cluster(n_workers=2) as client:
            deploy(client, OnnxModel("mlp", bundled_model_path()))
            deploy_pipeline(client, Pipeline(model="mlp", inbox="gateway-bench", partitions=2))
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            gateway_cmd = [
                sys.executable,
                "-m",
                "daskinfer.cli",
                "gateway",
                "--scheduler",
                client.scheduler.address,
                "--pipeline",
                "mlp=gateway-bench",
                "--http-port",
                str(port),
                "--no-grpc",
                "--log-level",
                "WARNING",
            ]
            with started(gateway_cmd, url):
                infer = f"{url}/v2/models/mlp/infer"
                check_answer(infer, 1)
                check_answer(infer, BLOCK_ROWS)
                results["gateway"] = measure("gateway", infer, files["single"], duration)
                results["gateway_blocks"] = measure("gateway, 64-row binary blocks", infer, files["blocks"], duration)
            # the same gateway on uvloop (distributed.admin.event-loop), and as two processes on one port
            variants = {
                "gateway_uvloop": ([], dict(ENV, DASK_DISTRIBUTED__ADMIN__EVENT_LOOP="uvloop")),
                "gateway_2proc": (["--workers", "2"], ENV),
            }
            for key, (extra, env) in variants.items():
                # a fresh port each time: the last run's closed connections (TIME_WAIT) hold the old one,
                # which --workers' check that the port is free refuses
                port = free_port()
                url, infer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v2/models/mlp/infer"
                with started(on_http_port(gateway_cmd, port) + extra, url, env=env):
                    check_answer(infer, 1)
                    results[key] = {"peak": load(infer, files["single"], "closed", duration)}
                    print(f"{key}: {json.dumps(results[key])}", flush=True)
            # its gRPC front end: unary ModelInfer calls vs one ModelStreamInfer stream, 64 in flight each
            port, grpc_port = free_port(), free_port()
            grpc_cmd = [a for a in on_http_port(gateway_cmd, port) if a != "--no-grpc"]
            grpc_cmd += ["--grpc-port", str(grpc_port)]
            with started(grpc_cmd, f"http://127.0.0.1:{port}"):
                for mode in ("unary", "stream"):
                    results[f"gateway_grpc_{mode}"] = {"peak": grpc_load(f"127.0.0.1:{grpc_port}", mode, duration)}
                    print(f"gateway_grpc_{mode}: {json.dumps(results[f'gateway_grpc_{mode}'])}", flush=True)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        fastapi_cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_server:app",
            "--app-dir",
            HERE,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with started(fastapi_cmd, url, env=dict(ENV, DASKINFER_BENCH_MODEL=bundled_model_path())):
            infer = f"{url}/v2/models/mlp/infer"
            check_answer(infer, 1)
            results["fastapi"] = measure("fastapi", infer, files["single"], duration)

    g, gb, f = results["gateway"], results["gateway_blocks"], results["fastapi"]
    summary = {
        "gateway_req_s": g["peak"]["req_s"],
        "fastapi_req_s": f["peak"]["req_s"],
        "gateway_vs_fastapi": round(g["peak"]["req_s"] / f["peak"]["req_s"], 2),
        "gateway_p99_ms_50pct": g["open_50pct"]["p99_ms"],
        "fastapi_p99_ms_50pct": f["open_50pct"]["p99_ms"],
        "gateway_p99_ms_10pct": g["open_10pct"]["p99_ms"],
        "fastapi_p99_ms_10pct": f["open_10pct"]["p99_ms"],
        "gateway_rows_s_blocks": round(gb["peak"]["req_s"] * BLOCK_ROWS, 1),
        "gateway_p99_ms_50pct_blocks": gb["open_50pct"]["p99_ms"],
        "blocks_vs_fastapi_rows": round(gb["peak"]["req_s"] * BLOCK_ROWS / f["peak"]["req_s"], 1),
        "gateway_uvloop_req_s": results["gateway_uvloop"]["peak"]["req_s"],
        "gateway_uvloop_vs_asyncio": round(results["gateway_uvloop"]["peak"]["req_s"] / g["peak"]["req_s"], 2),
        "gateway_2proc_req_s": results["gateway_2proc"]["peak"]["req_s"],
        "gateway_2proc_vs_fastapi": round(results["gateway_2proc"]["peak"]["req_s"] / f["peak"]["req_s"], 2),
        "gateway_grpc_unary_req_s": results["gateway_grpc_unary"]["peak"]["req_s"],
        "gateway_grpc_stream_req_s": results["gateway_grpc_stream"]["peak"]["req_s"],
        "gateway_grpc_stream_vs_unary": round(
            results["gateway_grpc_stream"]["peak"]["req_s"] / results["gateway_grpc_unary"]["peak"]["req_s"], 2
        ),
        "errors": sum(r[k]["errors"] for r in results.values() for k in r),
        "seconds": round(time.monotonic() - started_at, 1),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
