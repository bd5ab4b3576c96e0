"""docs/api/wire.rst holds: requests built and results read from the page alone, on real brokers.

The producing and consuming code (tests/wire_producer.py) is plain msgpack with no daskinfer
import; daskinfer only deploys the pipelines (the session LocalCluster) and gives the reference
outputs.  The page's shell examples (``redis-cli``, ``kcat``) and its Java producer run as the
page shows them, with no Python on the producing side.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import wire_producer as wp
from kafka_broker import LIB, kafka_bootstrap, kafka_broker  # noqa: F401  (fixtures: a real Kafka broker)
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures: a real redis-server on loopback)

from daskinfer import Pipeline, deploy_pipeline
from daskinfer.testing import run_onnx_directly

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "api", "wire.rst")
EXAMPLES = os.path.join(ROOT, "docs", "examples")
ZEROS = np.zeros((1, 16), np.float32)


def _rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32).tolist()


def _expected(mlp_path: str, rows) -> np.ndarray:
    return run_onnx_directly(mlp_path, {"x": np.asarray(rows, np.float32).reshape(-1, 16)})["probabilities"]


def _values(a: wp.Array) -> np.ndarray:
    return np.asarray(a.values(), np.float32).reshape(a.shape)


def _table_keys(title: str) -> set[str]:
    """The keys in the first column of the table under ``title`` on the page."""
    text = open(PAGE).read()
    section = text[text.index(f"\n{title}\n") :]
    table = section[section.index("\n====") :]
    lines = table.split("\n")
    rules = [i for i, ln in enumerate(lines) if ln.startswith("====")]
    body = lines[rules[1] + 1 : rules[2]]
    return {k for ln in body if ln and not ln.startswith(" ") for k in re.split(r",\s*", ln.split("  ")[0])}


def test_the_page_lists_every_request_field_the_pipeline_reads():
    from daskinfer.wire.frames import FRAME_KEYS
    from daskinfer.wire.messages import REQUEST_KEYS

    assert _table_keys("Request message") == REQUEST_KEYS
    assert _table_keys("Request frame") == FRAME_KEYS


def test_the_producer_imports_no_daskinfer():
    code = "import sys, wire_producer; print(sorted(m for m in sys.modules if m.startswith('daskinfer')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def redis_pipeline(client, mlp_deployed, redis_url):
    """A pipeline of the bundled MLP on Redis, 2 partitions; yields (redis connection, inbox, outbox, dead)."""
    redis = pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
    tag = uuid.uuid4().hex[:6]
    inbox, outbox, dead = f"wire-in-{tag}", f"wire-out-{tag}", f"wire-dead-{tag}"
    handle = deploy_pipeline(
        client,
        Pipeline(
            model=mlp_deployed,
            inbox=inbox,
            outbox=outbox,
            dead_letter=dead,
            partitions=2,
            connector="redis",
            connector_options={"url": redis_url},
        ),
    )
    with redis.Redis.from_url(redis_url) as r:
        try:
            yield r, inbox, outbox, dead
        finally:
            handle.stop()


def _stream(r, name: str, n: int, poll) -> list:
    """The decoded field ``d`` of the first ``n`` entries of stream ``name``, waiting for them."""
    poll(lambda: r.xlen(name) >= n, timeout=60, what=f"{n} entries on redis stream {name!r}")
    return [wp.decode(fields[b"d"]) for _, fields in r.xrange(name)]


def test_redis_cli_example_of_the_page(redis_pipeline, redis_url, mlp_path):
    r, inbox, _, _ = redis_pipeline
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", os.path.join(EXAMPLES, "redis-cli.sh")],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "REDIS_URL": redis_url, "INBOX": inbox},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"\nthe redis-cli example ran in {time.monotonic() - t0:.2f}s")
    assert out.stdout.splitlines()[0] == "2", out.stdout  # HGET <inbox>:meta partitions
    assert "model 'mlp': input 'x' expects shape [N, 16], got [1, 15]" in out.stdout, out.stdout
    results = {m["id"]: m for m in (wp.decode(f[b"d"]) for _, f in r.xrange("daskinfer-replies-sh"))}
    assert set(results) == {"r1", "r2"}
    np.testing.assert_allclose(_values(results["r1"]["out"]["probabilities"]), _expected(mlp_path, ZEROS)[0])
    assert results["r1"]["m"] == "mlp" and "err" not in results["r1"]
    assert results["r2"]["err"][0] == "InputValidationError" and "out" not in results["r2"]
    r.delete("daskinfer-replies-sh")


def test_redis_requests_and_results_as_the_page_says(redis_pipeline, mlp_path, poll):
    r, inbox, outbox, dead = redis_pipeline
    n = int(r.hget(f"{inbox}:meta", "partitions"))
    reply = f"daskinfer-replies-{uuid.uuid4().hex[:8]}"
    r.xadd(reply, {"d": b""}, maxlen=0)  # it must exist before results come
    rows = _rows(12, seed=1)
    sent = []

    def put(msg: dict, key: str | None = None, raw: bytes | None = None, field: str = "d") -> None:
        p = wp.crc32_partition(key, n) if key is not None else 0
        r.xadd(f"{inbox}:{p}", {field: raw if raw is not None else wp.encode(msg)})

    # one-row requests of two keys (each key in order), with t echoed
    for i, row in enumerate(rows[:8]):
        key = f"user-{i % 2}"
        put({"id": f"s{i}", "in": {"x": wp.array("<f4", (16,), row)}, "k": key, "r": reply, "t": 1.5 + i}, key)
        sent.append(f"s{i}")
    # a block of 4 rows, with "b"
    put({"id": "blk", "b": True, "in": {"x": wp.array("<f4", (4, 16), sum(rows[8:12], []))}, "r": reply})
    # a frame of 3 one-row requests with keys
    frame_rows = sum(rows[:3], [])
    put(
        {"f": 1, "ids": ["f0", "f1", "f2"], "in": {"x": wp.array("<f4", (3, 16), frame_rows)}, "k": ["a", None, "b"]}
        | {"r": reply}
    )
    # a deadline already passed, a misspelt field, a reply target not allowed, no field d
    put({"id": "late", "in": {"x": wp.array("<f4", (16,), rows[0])}, "d": time.time() - 60, "r": reply})
    put({"id": "typo", "inputs": {"x": wp.array("<f4", (16,), rows[0])}, "r": reply})
    put({"id": "elsewhere", "in": {"x": wp.array("<f4", (16,), rows[0])}, "r": "somebody-elses-stream"})
    put({}, raw=wp.encode({"id": "nofield", "in": {"x": wp.array("<f4", (16,), rows[0])}}), field="data")

    got = _stream(r, reply, 8 + 1 + 1 + 2, poll)
    singles = {m["id"]: m for m in got if "f" not in m}
    frames = [m for m in got if "f" in m]
    want = _expected(mlp_path, rows)
    for i in range(8):
        m = singles[f"s{i}"]
        np.testing.assert_allclose(_values(m["out"]["probabilities"]), want[i], rtol=1e-5, atol=1e-6)
        assert m["k"] == f"user-{i % 2}" and m["t"] == 1.5 + i and m["m"] == "mlp" and "b" not in m
        assert set(m["tm"]) >= {"queue", "infer", "batch"}
    for key in ("user-0", "user-1"):
        order = [m["id"] for m in got if m.get("k") == key]
        assert order == [i for i in sent if singles[i]["k"] == key], "one key's results come in request order"
    blk = singles["blk"]
    assert blk["b"] is True and blk["out"]["probabilities"].shape == (4, 2)
    np.testing.assert_allclose(_values(blk["out"]["probabilities"]), want[8:12], rtol=1e-5, atol=1e-6)
    assert singles["late"]["err"][0] == "DeadlineExceededError"
    assert singles["typo"]["err"][0] == "RequestError"
    assert "unknown field 'inputs' (did you mean 'in'?)" in singles["typo"]["err"][1]
    (frame,) = frames
    assert frame["f"] == 1 and frame["ids"] == ["f0", "f1", "f2"] and frame["k"] == ["a", None, "b"]
    np.testing.assert_allclose(_values(frame["out"]["probabilities"]), want[:3], rtol=1e-5, atol=1e-6)

    # no reply target read from the bytes: the pipeline's outbox
    (nofield,) = _stream(r, outbox, 1, poll)
    assert nofield["id"].startswith("undecodable-") and nofield["err"][0] == "CodecError"
    assert "empty message (0 bytes)" in nofield["err"][1] and "field 'd'" in nofield["err"][1]
    letters = {m["id"]: m for m in _stream(r, dead, 4, poll)}
    assert letters["elsewhere"]["error_type"] == "ReplyTargetError"
    assert "daskinfer-replies-" in letters["elsewhere"]["error"]
    assert wp.decode(letters["typo"]["data"])["inputs"]["x"].shape == (16,), "dead letters keep the bytes"
    assert letters["late"]["error_type"] == "DeadlineExceededError"
    assert all(isinstance(m["at"], float) for m in letters.values())
    assert "elsewhere" not in singles, "a refused reply target gets no result"
    r.delete(reply)


# -- Kafka -----------------------------------------------------------------------------------------


@pytest.fixture
def kafka_pipeline(client, mlp_deployed, kafka_bootstrap):
    """A pipeline of the bundled MLP on Kafka, 2 partitions; yields (bootstrap, inbox, outbox, dead)."""
    if not os.environ.get("CI"):
        pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
    tag = uuid.uuid4().hex[:6]
    inbox, outbox, dead = f"wire-in-{tag}", f"wire-out-{tag}", f"wire-dead-{tag}"
    handle = deploy_pipeline(
        client,
        Pipeline(
            model=mlp_deployed,
            inbox=inbox,
            outbox=outbox,
            dead_letter=dead,
            partitions=2,
            connector="kafka",
            connector_options={"bootstrap_servers": kafka_bootstrap},
        ),
    )
    try:
        yield kafka_bootstrap, inbox, outbox, dead
    finally:
        handle.stop()


def _topic(bootstrap: str, topic: str, n: int, poll) -> list:
    """``n`` messages of ``topic`` (read_committed) as (key, headers, value), waiting for them."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"wire-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    out: list = []

    def more() -> bool:
        out.extend(
            (m.key(), dict(m.headers() or []), m.value()) for m in consumer.consume(100, 0.2) if m.error() is None
        )
        return len(out) >= n

    try:
        poll(more, timeout=90, what=f"{n} messages on kafka topic {topic!r}")
    finally:
        consumer.close()
    return out


def test_kafka_requests_and_results_as_the_page_says(kafka_pipeline, mlp_path, poll):
    from confluent_kafka import Producer

    bootstrap, inbox, outbox, dead = kafka_pipeline
    producer = Producer({"bootstrap.servers": bootstrap})
    rows = _rows(6, seed=2)
    for i, row in enumerate(rows):
        key = f"user-{i % 3}"
        msg = {"id": f"q{i}", "k": key, "in": {"x": wp.array("<f4", (16,), row)}}
        producer.produce(inbox, wp.encode(msg), partition=wp.crc32_partition(key, 2))
    bad = {"id": "bad", "k": "user-9", "in": {"x": wp.array("<f4", (15,), rows[0][:15])}}
    producer.produce(inbox, wp.encode(bad), partition=1)
    frame = {"f": 1, "ids": ["g0", "g1"], "in": {"x": wp.array("<f4", (2, 16), sum(rows[:2], []))}}
    producer.produce(inbox, wp.encode(frame), partition=0)
    assert producer.flush(30) == 0

    got = _topic(bootstrap, outbox, 8, poll)
    want = _expected(mlp_path, rows)
    singles = {}
    for key, headers, value in got:
        m = wp.decode(value)
        if "f" in m:
            assert m["ids"] == ["g0", "g1"] and "correlation_id" not in headers, "a frame has no header"
            np.testing.assert_allclose(_values(m["out"]["probabilities"]), want[:2], rtol=1e-5, atol=1e-6)
            continue
        assert headers["correlation_id"] == m["id"].encode() and key == m["k"].encode()
        singles[m["id"]] = m
    for i in range(6):
        np.testing.assert_allclose(_values(singles[f"q{i}"]["out"]["probabilities"]), want[i], rtol=1e-5, atol=1e-6)
    assert singles["bad"]["err"][0] == "InputValidationError"
    ((key, headers, value),) = _topic(bootstrap, dead, 1, poll)
    letter = wp.decode(value)
    assert letter["id"] == "bad" and key == b"user-9" and headers["correlation_id"] == b"bad"
    assert letter["data"] == wp.encode(bad), "the dead letter keeps the request's bytes"


def _request_file(path: str, rid: str) -> None:
    with open(path, "wb") as f:
        f.write(wp.encode({"id": rid, "k": "user-1", "in": {"x": wp.array("<f4", (16,), [0.0] * 16)}}))


def test_java_producer_of_the_page(kafka_pipeline, mlp_path, tmp_path, poll):
    bootstrap, inbox, outbox, _ = kafka_pipeline
    _request_file(str(tmp_path / "request.bin"), "j1")
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "java",
            "-cp",
            os.path.join(LIB, "*"),
            os.path.join(EXAMPLES, "SendRequest.java"),
            bootstrap,
            inbox,
            "1",
            "user-1",
            str(tmp_path / "request.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    print(f"\nthe Java producer (JVM start, compile, send) ran in {time.monotonic() - t0:.1f}s")
    assert f"sent to {inbox}[1] at offset 0" in out.stdout
    ((key, headers, value),) = _topic(bootstrap, outbox, 1, poll)
    result = wp.decode(value)
    assert result["id"] == "j1" and key == b"user-1" and headers["correlation_id"] == b"j1"
    np.testing.assert_allclose(_values(result["out"]["probabilities"]), _expected(mlp_path, ZEROS)[0])


def test_kcat_example_of_the_page(kafka_pipeline, mlp_path, tmp_path):
    if shutil.which("kcat") is None:
        pytest.skip("kcat is not installed (apt-get install kcat); the Java producer test covers Kafka without it")
    bootstrap, inbox, outbox, _ = kafka_pipeline
    out = subprocess.run(
        ["bash", os.path.join(EXAMPLES, "kcat.sh")],
        capture_output=True,
        timeout=90,
        cwd=tmp_path,
        env={**os.environ, "KAFKA": bootstrap, "INBOX": inbox, "OUTBOX": outbox},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (tmp_path / "result.txt").read_bytes()
    head, _, value = text.partition(b":\n")
    assert head.startswith(b"key user-1, headers correlation_id=k1"), text
    result = wp.decode(value)
    assert result["id"] == "k1" and result["k"] == "user-1"
    np.testing.assert_allclose(_values(result["out"]["probabilities"]), _expected(mlp_path, ZEROS)[0])
