"""A cluster of real processes started through Dask's CLI on 127.0.0.1: ``dask scheduler`` and
``dask worker`` with ``--preload daskinfer.preload``, as platform engineers run it.

Under a steady load a third worker joins, one worker is retired gracefully and one is killed:
every request is answered once and right.  Settings come from the deploying client's config,
whatever the scheduler's own config says.
"""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
from dask_processes import DaskProcesses
from distributed import Client

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline
from daskinfer.connectors.embedded import BrokerRPC
from daskinfer.testing import random_rows, run_onnx_directly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def dask_cli_cluster(tmp_path):
    procs = DaskProcesses(tmp_path)
    address = procs.scheduler()
    try:
        yield address, procs.worker, procs
    finally:
        procs.stop()


def test_a_worker_joins_one_retires_and_one_dies_under_load_and_nothing_is_lost(dask_cli_cluster, mlp_path, poll):
    address, worker, procs = dask_cli_cluster
    worker("w1")
    w2 = worker("w2", nanny=False)  # a bare worker process: killing it is losing a machine
    with Client(address) as client:
        client.wait_for_workers(2, timeout=60)
        assert "daskinfer ready on worker" in procs.log("w1"), "the preload says it is ready"
        assert "daskinfer broker and controller ready" in procs.log("scheduler")
        deploy(client, OnnxModel("mlp", mlp_path))
        inbox = "cli-requests"
        # the deploying client's config governs the pipeline, not the scheduler's defaults
        with dask.config.set({"daskinfer.broker.max-messages": 500_000, "daskinfer.batching.max-batch-size": 1234}):
            handle = deploy_pipeline(client, Pipeline(model="mlp", inbox=inbox, partitions=4))
        info = client.sync(BrokerRPC(client.scheduler).info, inbox)
        assert info["settings"]["max_messages"] == 500_000, "topic made with the client's settings"
        assert handle.spec.settings.max_batch_size == 1234
        assert {r["max_batch_size"] for r in handle.status()["runners"]} == {1234}, "the workers run with them"

        rows = random_rows(2000, seed=21)
        results: dict[str, object] = {}
        twice = 0
        sent: list[str] = []
        with InferenceClient(client, inbox=inbox) as ic:
            stop = threading.Event()
            done_producing = threading.Event()

            def produce() -> None:  # a steady, paced load (~5k requests/s) that goes on through every change
                i = 0
                while not done_producing.is_set():
                    sent.append(ic.send(rows[i % 2000], key=f"k{i % 17}", request_id=f"q{i}"))
                    i += 1
                    if i % 100 == 0:
                        time.sleep(0.02)

            def consume() -> None:
                nonlocal twice
                while not stop.is_set() or len(results) < len(sent):
                    for r in ic.results(timeout=0.5):
                        if r.id in results:
                            twice += 1
                        results[r.id] = r
                        break
                    if stop.is_set() and time.monotonic() > give_up:
                        return

            give_up = time.monotonic() + 240
            producer = threading.Thread(target=produce, daemon=True)
            consumer = threading.Thread(target=consume, daemon=True)
            producer.start()
            consumer.start()
            poll(lambda: len(results) > 3000, timeout=60, what="answers before the changes")

            worker("w3")  # joins under load: it gets the model and partitions
            client.wait_for_workers(3, timeout=60)
            poll(
                lambda: len(set(handle.status()["assigned"].values())) == 3,
                timeout=60,
                what="a partition on the worker that joined",
            )
            before = len(results)
            poll(lambda: len(results) > before + 2000, timeout=60, what="answers with three workers")

            w1 = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "w1")
            client.retire_workers([w1], close_workers=True)  # graceful: its partitions drain and move
            poll(lambda: w1 not in client.scheduler_info()["workers"], timeout=60, what="w1 retired")
            before = len(results)
            poll(lambda: len(results) > before + 2000, timeout=60, what="answers after the retirement")

            w2.kill()  # SIGKILL: no drain, no goodbye
            poll(lambda: len(client.scheduler_info()["workers"]) == 1, timeout=60, what="w2 gone")
            before = len(results)
            poll(lambda: len(results) > before + 2000, timeout=60, what="answers after the kill")
            done_producing.set()
            producer.join(60)
            stop.set()
            consumer.join(250)
            status = handle.status()
        lost = len(set(sent) - set(results))
        print(
            f"\ncli cluster: sent {len(sent)}, answered {len(results)}, lost {lost}, delivered twice {twice}, "
            f"moves {status['moves']}, duplicates dropped by the client {ic.duplicates}"
        )
        n = len(sent)
        assert n > 10_000
        assert lost == 0 and twice == 0
        want = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        got = np.stack([results[f"q{i}"].value() for i in range(n)])
        np.testing.assert_allclose(got, want[np.arange(n) % 2000], rtol=1e-5, atol=1e-6)
        assert set(status["assigned"]) == {0, 1, 2, 3} and len(set(status["assigned"].values())) == 1
        handle.stop()
