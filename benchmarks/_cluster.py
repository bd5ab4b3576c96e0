"""A Dask cluster as platform engineers run it: `dask scheduler` and `dask worker` processes.

The benchmarks use it rather than ``LocalCluster`` because a ``LocalCluster`` runs the
scheduler (and so the embedded broker) inside the client's process, where it competes
with the client for one interpreter lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

from distributed import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_cluster(
    n_workers: int = 2,
    threads: int = 1,
    worker_args: Sequence[Sequence[str]] = (),
    worker_env: Sequence[Mapping[str, str]] = (),
) -> Iterator[Client]:
    """Start a scheduler and ``n_workers`` one-thread workers on loopback; yield a client.

    ``worker_args[i]`` and ``worker_env[i]``: more ``dask worker`` arguments and environment of
    worker ``i`` (e.g. ``["--resources", "GPU=1"]`` and ``{"CUDA_VISIBLE_DEVICES": "0"}``)."""
    port = free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    py = sys.executable
    procs = [
        subprocess.Popen(
            [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("dask scheduler did not start") from None
                time.sleep(0.1)
        for i in range(n_workers):
            extra = list(worker_args[i]) if i < len(worker_args) else []
            procs.append(
                subprocess.Popen(
                    [
                        py,
                        "-m",
                        "distributed.cli.dask_worker",
                        f"127.0.0.1:{port}",
                        "--nthreads",
                        str(threads),
                        "--no-nanny",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                        *extra,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**env, **(worker_env[i] if i < len(worker_env) else {})},
                )
            )
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_for_workers(n_workers, timeout=60)
            yield client
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
