"""``daskinfer status`` against a real scheduler, and ``daskinfer run``'s line of figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
from cli_process import Run
from distributed import LocalCluster
from timing import scaled

from daskinfer import InferenceClient, Pipeline, deploy_pipeline
from daskinfer.cli.status import COLUMNS, figures_line, status_table
from daskinfer.testing import random_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daskinfer.cli", *args], capture_output=True, text=True, timeout=scaled(timeout)
    )


def _rows(out: str, name: str) -> dict[str, list[str]]:
    """The table rows of pipeline ``name`` by partition ("all" for the pipeline)."""
    return {cols[1]: cols for cols in (line.split() for line in out.splitlines()) if cols and cols[0] == name}


def test_status_shows_partitions_owners_and_figures(client, mlp_deployed, poll):
    name = f"status-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(name=name, model=mlp_deployed, inbox=name, partitions=2))
    stop = threading.Event()
    try:
        with InferenceClient(client, inbox=name) as ic:
            for _ in range(3):  # the wrong dtype: three requests answered with an error
                assert ic.submit({"x": np.zeros(16, np.float64)}).result(timeout=30).error_type is not None
            rows = random_rows(32, seed=2)

            def load() -> None:  # traffic while status runs, bounded in count and time
                for i in range(50_000):
                    if stop.is_set():
                        return
                    ic.submit(rows[i % 32]).result(timeout=30)

            sender = threading.Thread(target=load, daemon=True)
            sender.start()

            def seen() -> bool:
                h = client.sync(client.scheduler.daskinfer_pipeline_history, name=name)[name]
                return h["totals"]["errors"] == 3 and bool(h["points"]) and h["points"][-1]["requests_s"] > 0

            poll(seen, timeout=30, what="the controller's figures with traffic and the three errors")
            proc = _cli(
                "status",
                "--scheduler",
                client.scheduler.address,
                "--pipeline",
                name,
                "--watch",
                "--count",
                "2",
                "--interval",
                "0.2",
            )
            stop.set()
            sender.join(30)
    finally:
        stop.set()
        handle.stop()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[1] == client.scheduler.address  # --watch: time and scheduler above each table
    assert lines[1].split() == list(COLUMNS)
    assert proc.stdout.count("PIPELINE") == 2  # redrawn once
    table = _rows(proc.stdout, name)
    assert set(table) == {"all", "0", "1"}
    whole = table["all"]
    assert whole[3] == "2/2" and whole[-1] == "3"  # partitions placed; errors
    assert float(whole[4].replace(",", "")) > 0  # requests/s
    assert whole[8].endswith("ms") and whole[9].endswith("ms")  # p50, p99
    workers = set(client.scheduler_info()["workers"])
    for p in ("0", "1"):
        assert table[p][2] in workers and table[p][3] == "running"
    assert int(table["0"][-1]) + int(table["1"][-1]) == 3


def test_status_of_a_scheduler_without_pipelines():
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as cluster:
        proc = _cli("status", "--scheduler", cluster.scheduler_address, timeout=60)
    assert proc.returncode == 1
    assert "no daskinfer pipelines on" in proc.stderr and "no daskinfer controller" in proc.stderr


@pytest.mark.slow  # daskinfer run starts a LocalCluster of worker processes
@pytest.mark.timeout(420)
def test_run_prints_figures_while_it_runs():
    """Two lines of figures for the pipeline, the last with the rates of its interval (no traffic: 0).

    It reads the output until they are there (the first lines may come before the controller has
    placed the partitions or measured a rate), then stops the run with SIGTERM.
    """
    head = "daskinfer: requests: 2/2 partitions"

    def lines() -> list[str]:
        return [line for line in run.stdout.splitlines() if line.startswith(head)]

    run = Run(["run", os.path.join(ROOT, "conf", "local.yaml"), "--report-interval", "1"])
    try:
        run.wait_until(
            lambda: len(lines()) >= 2 and "0 req/s, 0 rows/s, lag 0" in lines()[-1],
            what="two lines of figures, the last with rates",
        )
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.output()
    finally:
        run.kill()
    assert all(line.endswith("errors 0") or line.endswith("errors 0 (no rates yet)") for line in lines()), run.stdout


def _history(points: list[dict], owners: dict, errors: int = 0) -> dict:
    return {
        "points": points,
        "partition_points": {0: points},
        "owners": owners,
        "partitions": 2,
        "totals": {"answered": 10, "errors": errors},
        "failures": {1: "ConfigError: no such model"},
    }


def test_figures_line_and_table_format():
    point = {
        "t": 1.0,
        "requests_s": 1234.5,
        "rows_s": 2469.0,
        "errors_s": 0.0,
        "lag": 12,
        "batch_rows": 61.7,
        "p50": 0.0012,
        "p99": 0.0345,
    }
    h = _history([point], {0: {"worker": "tcp://w:1", "state": "running", "errors": 2}}, errors=2)
    assert figures_line("mlp", h) == (
        "mlp: 1/2 partitions, 1,234 req/s, 2,469 rows/s, lag 12, batch 62, p50 1.2ms, p99 34.5ms, errors 2"
    )
    assert figures_line("mlp", _history([], {})) == "mlp: 0/2 partitions, 10 answered, errors 0 (no rates yet)"
    table = _rows(status_table({"mlp": h}), "mlp")
    assert table["all"] == ["mlp", "all", "-", "1/2", "1,234", "2,469", "12", "62", "1.2ms", "34.5ms", "2"]
    assert table["0"][2:4] == ["tcp://w:1", "running"]
    assert table["1"][3:5] == ["failed:", "ConfigError:"]
