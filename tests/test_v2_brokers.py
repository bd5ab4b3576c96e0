"""KServe v2 (Open Inference Protocol) JSON on broker inboxes, end to end, with no Python producer.

``redis-cli`` and ``kcat`` put v2 requests on a Redis stream and a Kafka topic of a pipeline
deployed on the session LocalCluster (real brokers: tests/redis_server.py, tests/kafka_broker.py),
and read the v2 answers; the outputs are compared with onnxruntime run directly on the same rows.
The page's examples (docs/examples/v2-*.sh) run as docs/api/wire.rst shows them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest
import wire_producer as wp
from kafka_broker import kafka_bootstrap, kafka_broker  # noqa: F401  (fixtures: a real Kafka broker)
from redis_server import redis_server, redis_url  # noqa: F401  (fixtures: a real redis-server on loopback)
from test_wire_conformance import EXAMPLES, _topic, kafka_pipeline, redis_pipeline  # noqa: F401  (fixtures)

from daskinfer.testing import bundled_model_path, run_onnx_directly

pytestmark = pytest.mark.timeout(180)

ZEROS = [0.0] * 16
HALVES = [0.5] * 16


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        reason = f"{tool} is not installed (apt-get install {'redis-tools' if tool == 'redis-cli' else tool})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


def _expected(rows) -> np.ndarray:
    return run_onnx_directly(bundled_model_path(), {"x": np.asarray(rows, np.float32).reshape(-1, 16)})["probabilities"]


def _probabilities(resp: dict) -> np.ndarray:
    (out,) = resp["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32", out
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, timeout=120, **kw)
    assert out.returncode == 0, (out.stdout + out.stderr).decode(errors="replace")
    return out


def _json_lines(text: bytes) -> dict[str, dict]:
    """The v2 JSON answers among the lines of ``text``, by id (an error without one under '?')."""
    found = {}
    for line in text.splitlines():
        start = line.find(b"{")
        if start < 0:
            continue
        try:
            obj = json.loads(line[start:])
        except ValueError:
            continue  # binary tensor data after a JSON header
        found[obj.get("id", "?")] = obj
    return found


# -- Redis: redis-cli ------------------------------------------------------------------------------


def test_redis_cli_v2_example_of_the_page(redis_pipeline, redis_url):
    _need("redis-cli")
    r, inbox, _, dead = redis_pipeline
    out = _run(
        ["bash", os.path.join(EXAMPLES, "v2-redis-cli.sh")], env={**os.environ, "REDIS_URL": redis_url, "INBOX": inbox}
    )
    answers = _json_lines(out.stdout)
    np.testing.assert_allclose(_probabilities(answers["r1"]), _expected([ZEROS, HALVES]), rtol=1e-6)
    assert answers["r1"]["model_name"] == "mlp" and answers["r1"]["model_version"] == "1"
    assert answers["r2"] == {
        "id": "r2",
        "error": "CodecError: v2 request r2: tensor 'x': shape [1, 16] needs 16 values, got 15",
    }
    np.testing.assert_allclose(_probabilities(answers["r3"]), _expected([HALVES]), rtol=1e-6)
    assert out.stdout.count(b"\ncontent-type\napplication/json\n") == 3, out.stdout

    # r4 came as binary tensor data and asked for its output as binary data
    entries = {json.loads(f[b"d"][: int(f.get(b"inference-header-content-length", len(f[b"d"])))])["id"]: f
               for _, f in r.xrange("daskinfer-replies-v2sh")}  # fmt: skip
    f = entries["r4"]
    assert f[b"content-type"] == b"application/octet-stream", f
    n = int(f[b"inference-header-content-length"])
    head = json.loads(f[b"d"][:n])
    assert head["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}
    ]
    np.testing.assert_allclose(np.frombuffer(f[b"d"][n:], "<f4").reshape(1, 2), _expected([ZEROS]), rtol=1e-6)
    assert all(entries[i][b"content-type"] == b"application/json" for i in ("r1", "r2", "r3"))

    (letter,) = [wp.decode(f[b"d"]) for _, f in r.xrange(dead)]
    assert letter["id"] == "r2" and letter["error_type"] == "CodecError" and letter["data"].startswith(b'{"id":"r2"')
    assert letter["headers"] == {"content-type": "application/json", "reply-to": "daskinfer-replies-v2sh"}
    r.delete("daskinfer-replies-v2sh")


def test_redis_v2_requests_on_the_outbox_with_errors_for_bad_ones_alone(redis_pipeline, redis_url):
    _need("redis-cli")
    r, inbox, outbox, dead = redis_pipeline
    cli = ["redis-cli", "-u", redis_url]
    rows = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)

    def send(rid: str, tensors: list[dict], *fields: str, partition: int = 1) -> None:
        body = json.dumps({"id": rid, "inputs": tensors}, separators=(",", ":"))
        _run([*cli, "XADD", f"{inbox}:{partition}", "*", "content-type", "application/json", *fields, "d", body])

    def x(data, shape, name="x", datatype="FP32") -> dict:
        return {"name": name, "shape": shape, "datatype": datatype, "data": data}

    send("a1", [x(rows[:3].tolist(), [3, 16])], "key", "user-1")  # nested rows
    send("a2", [x(rows[3].tolist()[:15], [1, 15])], "key", "user-1")  # valid v2, the wrong shape for the model
    send("a3", [x(rows[3].tolist(), [1, 16], name="input-0")], "key", "user-1")  # one input: under any name
    _run([*cli, "XADD", f"{inbox}:1", "*", "content-type", "application/json", "d",
          '{"id":"a4","inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[NaN]}]}'])  # fmt: skip
    send("a5", [x(rows[4].tolist(), [1, 16], datatype="FP64")], "model", "mlp")  # FP64 data for a float32 model
    send("a6", [x(rows[4].tolist(), [1, 16])])  # and the next one is answered

    # read the outbox with XREAD, as a shell user would, until all six are there
    answers: dict[str, dict] = {}
    last = "0-0"
    deadline = time.monotonic() + 90
    while len(answers) < 6:
        assert time.monotonic() < deadline, f"6 answers on {outbox!r} within 90 s; have {sorted(answers)}"
        got = _run([*cli, "--raw", "XREAD", "COUNT", "10", "BLOCK", "60000", "STREAMS", outbox, last]).stdout
        lines = got.splitlines()
        assert lines, f"no answer on {outbox!r} within 60 s; have {sorted(answers)}"
        ids = [ln.decode() for ln in lines if ln[:1].isdigit() and b"-" in ln]
        last = ids[-1]
        answers.update(_json_lines(got))
    np.testing.assert_allclose(_probabilities(answers["a1"]), _expected(rows[:3]), rtol=1e-6)
    assert (
        answers["a2"]["error"].startswith("InputValidationError: ") and "[N, 16], got [1, 15]" in answers["a2"]["error"]
    )
    np.testing.assert_allclose(_probabilities(answers["a3"]), _expected(rows[3:4]), rtol=1e-6)
    assert (
        answers["a4"]["error"].startswith("CodecError: ") and "NaN, which JSON does not allow" in answers["a4"]["error"]
    )
    assert answers["a5"]["error"].startswith("InputValidationError: "), answers["a5"]
    np.testing.assert_allclose(_probabilities(answers["a6"]), _expected(rows[4:5]), rtol=1e-6)
    letters = {m["id"]: m for m in (wp.decode(f[b"d"]) for _, f in r.xrange(dead))}
    assert set(letters) == {"a2", "a4", "a5"}
    assert letters["a2"]["headers"] == {"content-type": "application/json", "key": "user-1"}


# -- Kafka: kcat -----------------------------------------------------------------------------------


def _kcat_answers(text: bytes) -> list[tuple[str, dict[str, str], dict]]:
    """``key K, headers A=B,C=D: {json}`` lines as (key, headers, answer)."""
    out = []
    for line in text.decode().splitlines():
        head, _, body = line.partition(": ")
        key, _, headers = head.removeprefix("key ").partition(", headers ")
        out.append((key, dict(h.split("=", 1) for h in headers.split(",")), json.loads(body)))
    return out


def _check_kcat_example(out: subprocess.CompletedProcess) -> None:
    answers = _kcat_answers(out.stdout)
    assert len(answers) == 3, out.stdout
    by_id = {a.get("id", "?"): (key, headers, a) for key, headers, a in answers}
    for key, headers, _ in answers:
        assert key == "user-1" and headers["content-type"] == "application/json", (key, headers)
    np.testing.assert_allclose(_probabilities(by_id["k1"][2]), _expected([ZEROS, HALVES]), rtol=1e-6)
    np.testing.assert_allclose(_probabilities(by_id["k3"][2]), _expected([HALVES]), rtol=1e-6)
    assert by_id["k1"][1]["correlation_id"] == "k1" and by_id["k3"][1]["correlation_id"] == "k3"
    _, headers, error = by_id["?"]  # k2 is not JSON: no id could be read from it
    assert error["error"].startswith("CodecError: v2 request: the request body is not JSON"), error
    assert headers["correlation_id"].startswith("undecodable-")


def test_kcat_v2_example_of_the_page(kafka_pipeline, tmp_path, poll):
    _need("kcat")
    bootstrap, inbox, outbox, dead = kafka_pipeline
    env = {**os.environ, "KAFKA": bootstrap, "INBOX": inbox, "OUTBOX": outbox}
    _check_kcat_example(_run(["bash", os.path.join(EXAMPLES, "v2-kcat.sh")], cwd=tmp_path, env=env))
    ((key, headers, value),) = _topic(bootstrap, dead, 1, poll)
    letter = wp.decode(value)
    assert (
        key == b"user-1"
        and letter["error_type"] == "CodecError"
        and letter["data"] == (tmp_path / "k2.json").read_bytes()
    )
    assert letter["headers"] == {"content-type": "application/json", "key": "user-1"}


def test_kcat_v2_to_a_reply_topic_and_binary_tensor_data(kafka_pipeline, tmp_path):
    _need("kcat")
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap, inbox, _, _ = kafka_pipeline
    reply = f"daskinfer-replies-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(reply, 1, 1)])[reply].result(30)
    env = {**os.environ, "KAFKA": bootstrap, "INBOX": inbox, "REPLY": reply}
    _check_kcat_example(_run(["bash", os.path.join(EXAMPLES, "v2-kcat.sh")], cwd=tmp_path, env=env))

    # binary tensor data, its output asked for as binary too, the headers marking it
    head = json.dumps(
        {
            "id": "b1",
            "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": 128}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    (tmp_path / "b1.bin").write_bytes(head + np.asarray([ZEROS, HALVES], "<f4").tobytes())
    headers = ["-H", "content-type=application/octet-stream", "-H", f"inference-header-content-length={len(head)}"]
    _run(["kcat", "-P", "-b", bootstrap, "-t", inbox, "-k", "user-2", *headers, "-H", f"reply-to={reply}", "b1.bin"],
         cwd=tmp_path)  # fmt: skip
    got = _run(["kcat", "-C", "-b", bootstrap, "-t", reply, "-o", "beginning", "-c", "4", "-q",
                "-X", "isolation.level=read_committed", "-f", "%k %h %S\n%s\n"]).stdout  # fmt: skip
    messages = {}
    while got:  # each: a line "key headers size", then size bytes (binary data may hold newlines), then "\n"
        first, _, got = got.partition(b"\n")
        key, hdrs, size = first.decode().split(" ")
        value, got = got[: int(size)], got[int(size) + 1 :]
        hdrs_map = dict(h.split("=", 1) for h in hdrs.split(","))
        messages[hdrs_map["correlation_id"]] = (key, hdrs_map, value)
    key, hdrs_map, value = messages["b1"]
    assert key == "user-2" and hdrs_map["content-type"] == "application/octet-stream", (key, hdrs_map)
    n = int(hdrs_map["inference-header-content-length"])
    resp = json.loads(value[:n])
    assert resp["id"] == "b1" and resp["outputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_allclose(np.frombuffer(value[n:], "<f4").reshape(2, 2), _expected([ZEROS, HALVES]), rtol=1e-6)
