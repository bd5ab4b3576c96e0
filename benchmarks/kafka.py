"""Throughput and latency of a pipeline whose inbox and outbox are Kafka topics, in both delivery modes.

Measured in one run, on the bundled MLP (16->64->64->2), through the embedded broker (the
baseline, same cluster, same run), then Kafka at least once and exactly once (each batch's
results and inbox offset in one Kafka transaction):

1. end to end with columnar blocks of 4096 rows per message (rows/s);
2. end to end with one request per message (requests/s);
3. latency p50/p99 end to end at 10% of the peak single-request rate of (2);
4. the floor: one bare hop through the same broker (confluent-kafka produce -> consume of small
   messages at the same rate, same client settings), which a request and its answer take twice.

A Kafka broker (KRaft, one JVM; jars from ``tests/kafka/pom.xml``, see ``tests/kafka_broker.py``)
on free loopback ports, a `dask scheduler` process and two one-thread `dask worker` processes;
the client runs in this process.  Everything shares this machine's cores, so read the figures
against ``benchmarks/throughput.py`` (the embedded broker) and ``benchmarks/redis.py`` on the
same box.  The last line printed is one JSON object.

    python benchmarks/kafka.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(_HERE)
sys.path.append(os.path.join(os.path.dirname(_HERE), "tests"))
from _cluster import process_cluster  # noqa: E402
from kafka_broker import KafkaBroker, missing  # noqa: E402
from throughput import bench_blocks, bench_latency, bench_single  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.connectors.kafka import KafkaTransport  # noqa: E402
from daskinfer.testing import bundled_model_path, random_rows  # noqa: E402

BLOCK = 4096


def bench_pipeline(
    client, label: str, pipe: Pipeline, transport, rows, block, n_blocks: int, repeats: int, lat_seconds: float
) -> dict[str, float]:
    """Blocks, single requests and latency at 10% load through one pipeline."""
    handle = deploy_pipeline(client, pipe)
    try:
        with InferenceClient(client, inbox=pipe.inbox, transport=transport) as ic:
            bench_single(ic, rows[:2000])  # warm up
            blocks = bench_blocks(ic, block, n_blocks)
            print(f"{label}, columnar blocks of {BLOCK}: {blocks:,.0f} rows/s")
            single, mean_batch, _ = max(bench_single(ic, rows) for _ in range(repeats))
            print(f"{label}, one request per message: {single:,.0f} requests/s (mean batch {mean_batch:.0f} rows)")
            p50, p99, achieved = bench_latency(ic, rows, single * 0.1, lat_seconds)
            print(f"{label}, latency at 10% load ({achieved:,.0f} req/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            assert ic.duplicates == 0
    finally:
        handle.stop()
    return {"single": single, "blocks": blocks, "p50": p50, "p99": p99}


def bench_raw_hop(bootstrap: str, rate: float, seconds: float) -> tuple[float, float]:
    """p50/p99 ms of one bare produce -> consume hop at ``rate`` messages/s (the broker's own latency here)."""
    import threading

    import numpy as np
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic("bench-raw-hop", 1, 1)]).values():
        f.result(30)
    common = {"bootstrap.servers": bootstrap, "socket.nagle.disable": True}
    producer = Producer({**common, "linger.ms": 1, "enable.idempotence": True, "acks": "all"})
    consumer = Consumer({**common, "group.id": "bench-raw-hop", "enable.auto.commit": False})
    consumer.assign([TopicPartition("bench-raw-hop", 0, 0)])
    latencies: list[float] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            m = consumer.poll(0.05)
            if m is not None and m.error() is None:
                latencies.append(time.time() - float(m.value()))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    t0, sent = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(int(rate * (time.perf_counter() - t0)) - sent):
            producer.produce("bench-raw-hop", str(time.time()).encode())
            sent += 1
        producer.poll(0)
        time.sleep(0.0005)
    producer.flush(10)
    end = time.monotonic() + 10
    while len(latencies) < sent and time.monotonic() < end:
        time.sleep(0.01)
    done.set()
    reader.join(5)
    consumer.close()
    ms = np.array(latencies[len(latencies) // 10 :]) * 1e3  # past the first tenth (connections warming up)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def kafka_pipeline(bootstrap: str, exactly_once: bool, partitions: int) -> Pipeline:
    inbox = f"bench-{'eos' if exactly_once else 'alo'}"
    return Pipeline(
        model="mlp",
        inbox=inbox,
        outbox=f"{inbox}-out",
        partitions=partitions,
        connector="kafka",
        connector_options={"bootstrap_servers": bootstrap, "exactly_once": exactly_once},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 90 s)")
    parser.add_argument("--partitions", type=int, default=2, help="inbox partitions (runners)")
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        raise SystemExit(reason)
    q = args.quick
    n_single = 20_000 if q else 100_000  # three pipelines in one run: --quick keeps each short
    n_blocks = 60 if q else 400
    repeats = 2 if q else 3
    lat_seconds = 2.5 if q else 8.0
    t_start = time.perf_counter()

    block = random_rows(BLOCK, seed=1)
    rows = random_rows(n_single, seed=2)
    with tempfile.TemporaryDirectory() as d:
        broker = KafkaBroker(d, quick_start=False)
        broker.start()
        try:
            with process_cluster(n_workers=2) as client:
                deploy(client, OnnxModel("mlp", bundled_model_path()))
                run = lambda label, pipe, transport: bench_pipeline(  # noqa: E731
                    client, label, pipe, transport, rows, block, n_blocks, repeats, lat_seconds
                )
                embedded = run(
                    "embedded broker (baseline)",
                    Pipeline(model="mlp", inbox="bench-embedded", partitions=args.partitions),
                    None,
                )
                bootstrap = broker.bootstrap
                alo = run(
                    "kafka, at least once", kafka_pipeline(bootstrap, False, args.partitions), KafkaTransport(bootstrap)
                )
                eos = run(
                    "kafka, exactly once", kafka_pipeline(bootstrap, True, args.partitions), KafkaTransport(bootstrap)
                )
            hop50, hop99 = bench_raw_hop(bootstrap, alo["single"] * 0.1, lat_seconds)
            print(
                f"the floor: one bare kafka hop (produce -> consume) at {alo['single'] * 0.1:,.0f} msg/s: "
                f"p50 {hop50:.1f} ms, p99 {hop99:.1f} ms (a request and its answer take two)"
            )
        finally:
            broker.stop()

    print(
        f"kafka / embedded broker (same run): single requests {alo['single'] / embedded['single']:.2f}, "
        f"blocks {alo['blocks'] / embedded['blocks']:.2f}"
    )
    print(
        f"exactly once / at least once (same run): single requests {eos['single'] / alo['single']:.2f}, "
        f"blocks {eos['blocks'] / alo['blocks']:.2f}"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
                "kafka_single_req_s": round(alo["single"]),
                "kafka_block_rows_s": round(alo["blocks"]),
                "kafka_eos_single_req_s": round(eos["single"]),
                "kafka_p99_ms_10pct": round(alo["p99"], 2),
                "kafka_eos_block_rows_s": round(eos["blocks"]),
                "kafka_eos_p99_ms_10pct": round(eos["p99"], 2),
                "embedded_single_req_s": round(embedded["single"]),
                "embedded_block_rows_s": round(embedded["blocks"]),
                "embedded_p99_ms_10pct": round(embedded["p99"], 2),
                "kafka_raw_hop_p50_ms": round(hop50, 2),
                "kafka_raw_hop_p99_ms": round(hop99, 2),
                "kafka_vs_embedded_single": round(alo["single"] / embedded["single"], 3),
                "kafka_vs_embedded_blocks": round(alo["blocks"] / embedded["blocks"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
