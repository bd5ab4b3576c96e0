"""Dask processes started through Dask's CLI for a test (scheduler, workers, servers), logged to
files in the test's tmp_path and stopped at its end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


class DaskProcesses:
    """``dask scheduler`` / ``dask worker`` (with ``--preload daskinfer.preload``) and other
    ``python -m`` processes on 127.0.0.1."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "DASK_LOGGING__DASKINFER": "info"}
        self.address: str | None = None

    def start(self, *args: str, name: str) -> subprocess.Popen:
        """``python -m ARGS``, its output in ``{name}.log``."""
        log = open(self.tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def scheduler(self, timeout: float = 60.0) -> str:
        """Start the scheduler; return its address."""
        sched_file = self.tmp_path / "scheduler.json"
        self.start(
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
            "--scheduler-file", str(sched_file), "--preload", "daskinfer.preload", name="scheduler",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched_file.exists(), self.log("scheduler")
        self.address = json.loads(sched_file.read_text())["address"]
        return self.address

    def worker(self, name: str, nanny: bool = True, *extra: str) -> subprocess.Popen:
        """Start a one-thread worker of the scheduler (``nanny=False``: a bare worker process);
        ``extra``: more ``dask worker`` arguments (``"--resources", "GPU=1"``)."""
        assert self.address is not None, "start the scheduler first"
        args = [
            "distributed.cli.dask_worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
            "--dashboard-address", ":0", "--name", name, "--preload", "daskinfer.preload",
        ]  # fmt: skip
        if not nanny:
            args.append("--no-nanny")
        return self.start(*args, *extra, name=name)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
