"""Soak: mixed good and bad traffic from several clients for a while, with faults on the way.

A cluster of real processes (``dask scheduler`` and two ``dask worker`` with nannies) serves a
local-model pipeline whose dead-letter topic nobody reads, and a pipeline whose model is served
by a separate ``daskinfer serve`` process.  Clients send good and malformed requests; one client
process is SIGKILLed mid-traffic (it never closes); a worker is SIGKILLed (its nanny starts
another); the model server is stopped and started again.  At the end: every request of the
surviving clients answered exactly once (good ones right; remote ones right or failed with a
remote-service error while the server was down), scheduler and worker memory flat, partitions
restarted at most a few times.

``pytest tests/test_soak.py --soak-seconds 600`` runs it longer (default 60 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import dask
import numpy as np
import pytest
from dask_processes import DaskProcesses
from distributed import Client

from daskinfer import InferenceClient, OnnxModel, Pipeline, RemoteModel, deploy, deploy_pipeline
from daskinfer.connectors.embedded import BrokerRPC
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RSS_GROWTH_LIMIT = 150 * 2**20  # bytes a long-lived process may grow between the warm-up and the end
MAX_RESTARTS = 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ABANDONED_CLIENT = """
import sys, time
from distributed import Client
from daskinfer import InferenceClient
from daskinfer.testing import random_rows
with Client(sys.argv[1]) as c:
    ic = InferenceClient(c, inbox=sys.argv[2])
    ic.start()
    rows = random_rows(1000, seed=99)
    i = 0
    while True:  # sends until it is SIGKILLed; never closes, never reads its results
        ic.send(rows[i % 1000])
        i += 1
        if i % 50 == 0:
            time.sleep(0.01)
"""


@pytest.fixture
def process_cluster(tmp_path):
    procs = DaskProcesses(tmp_path)
    address = procs.scheduler()
    for i in range(2):
        procs.worker(f"w{i}")
    try:
        yield address, procs.start
    finally:
        procs.stop()


def test_soak_mixed_traffic_through_faults(process_cluster, mlp_path, request):
    address, start = process_cluster
    seconds = float(request.config.getoption("--soak-seconds"))
    grpc_port = _free_port()
    serve_args = ("daskinfer.cli", "serve", "--onnx", f"mlp={mlp_path}", "--grpc-port", str(grpc_port), "--no-http")
    server = start(*serve_args, name="server")
    with Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        deploy(client, OnnxModel("mlp", mlp_path))
        deploy(
            client,
            RemoteModel(
                "remote-mlp",
                f"127.0.0.1:{grpc_port}",
                remote_name="mlp",
                retries=2,
                timeout=2,
                deadline=5,
                breaker_reset=0.5,
            ),
        )
        with dask.config.set({"daskinfer.broker.retained-messages": 200}):  # a small dead-letter topic nobody reads
            local = deploy_pipeline(
                client, Pipeline(model="mlp", inbox="soak-local", partitions=4, dead_letter="soak-dead")
            )
            remote = deploy_pipeline(
                client, Pipeline(model="remote-mlp", inbox="soak-remote", partitions=2, dead_letter="soak-dead")
            )
        rows = random_rows(2000, seed=31)
        want = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        stop = threading.Event()
        records: list[dict] = []

        def traffic(inbox: str, name: str, bad_every: int, pace: float) -> None:
            sent: dict[str, tuple[int, bool]] = {}
            got: dict[str, object] = {}
            twice = 0
            with InferenceClient(client, inbox=inbox) as ic:
                i = 0
                while not stop.is_set():
                    bad = bad_every and i % bad_every == 0
                    x = np.zeros(15, np.float32) if bad else rows[i % 2000]
                    sent[ic.send({"x": x}, key=f"{name}-{i % 11}")] = (i % 2000, bad)
                    i += 1
                    if i % 20 == 0:
                        time.sleep(pace)
                        for r in ic.results(timeout=0):
                            twice += r.id in got
                            got[r.id] = r
                deadline = time.monotonic() + 120
                while len(got) < len(sent) and time.monotonic() < deadline:
                    for r in ic.results(timeout=1.0):
                        twice += r.id in got
                        got[r.id] = r
            records.append({"name": name, "sent": sent, "got": got, "twice": twice})

        doomed = subprocess.Popen(
            [sys.executable, "-c", ABANDONED_CLIENT, address, "soak-local"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        threads = [threading.Thread(target=traffic, args=("soak-local", f"c{k}", 10, 0.01)) for k in range(2)]
        threads.append(threading.Thread(target=traffic, args=("soak-remote", "r0", 0, 0.02)))
        t0 = time.monotonic()
        for t in threads:
            t.start()

        def _rss(dask_worker=None, dask_scheduler=None) -> tuple[int, int]:  # defined here: pickled by value
            import psutil

            return os.getpid(), psutil.Process().memory_info().rss

        def rss() -> dict[int, int]:
            out = dict(client.run(_rss, on_error="ignore").values())  # a worker may be dying right now
            out.update([client.run_on_scheduler(_rss)])
            return out

        time.sleep(min(10.0, seconds / 5))
        warm = rss()
        peak = dict(warm)
        events = [(seconds * 0.3, "kill-client"), (seconds * 0.45, "kill-worker"), (seconds * 0.6, "restart-server")]
        while time.monotonic() - t0 < seconds:
            if events and time.monotonic() - t0 >= events[0][0]:
                _, what = events.pop(0)
                if what == "kill-client":
                    os.kill(doomed.pid, signal.SIGKILL)  # dies without closing
                elif what == "kill-worker":
                    pid = sorted(client.run(os.getpid).values())[0]
                    os.kill(pid, signal.SIGKILL)  # its nanny starts another
                else:
                    server.send_signal(signal.SIGINT)
                    server.wait(20)
                    time.sleep(1.0)
                    server = start(*serve_args, name="server2")
            for pid, v in rss().items():
                peak[pid] = max(peak.get(pid, 0), v)
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(300)
        if doomed.poll() is None:
            doomed.kill()
        end = rss()
        status_local, status_remote = local.status(), remote.status()
        dead = client.sync(BrokerRPC(client.scheduler).info, "soak-dead")
        local.stop()
        remote.stop()

    total = lost = twice = 0
    for rec in records:
        missing = set(rec["sent"]) - set(rec["got"])
        total += len(rec["sent"])
        lost += len(missing)
        twice += rec["twice"]
        for rid, (row, bad) in rec["sent"].items():
            r = rec["got"].get(rid)
            if r is None:
                continue
            if bad:
                assert r.error_type == "InputValidationError", (rec["name"], r.error_type, r.error)
            elif rec["name"].startswith("r") and not r.ok:
                assert r.error_type == "RemoteModelError", (r.error_type, r.error)
            else:
                assert r.ok, (rec["name"], r.error_type, r.error)
                np.testing.assert_allclose(r.value(), want[row], rtol=1e-5, atol=1e-6)
    remote_failed = sum(1 for rec in records if rec["name"].startswith("r") for r in rec["got"].values() if not r.ok)
    growth = {pid: end[pid] - warm[pid] for pid in warm if pid in end}
    restarts = status_local["restarts"] + status_remote["restarts"]
    print(
        f"\nsoak {seconds:.0f}s: requests {total}, lost {lost}, duplicated {twice}, remote requests failed while "
        f"the server was down {remote_failed}, restarts {restarts}, "
        f"dead letters kept {sum(dead['end']) - sum(dead['start'])} "
        f"dropped {dead['dropped']}, RSS growth per process (MiB) "
        f"{ {pid: round(g / 2**20, 1) for pid, g in growth.items()} }"
    )
    assert total > 1000 and lost == 0 and twice == 0
    assert all(g < RSS_GROWTH_LIMIT for g in growth.values()), growth
    assert restarts <= MAX_RESTARTS
    assert dead["dropped"] > 0, "the dead-letter topic filled up and kept its bound"
