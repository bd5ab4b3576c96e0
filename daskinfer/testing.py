"""Helpers for testing pipelines: a tiny ONNX model and direct reference runs.

``make_mlp_onnx`` needs the ``onnx`` package (``pip install daskinfer[onnx]``);
the rest needs only daskinfer's own dependencies.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def make_mlp_onnx(n_in: int = 16, hidden: int = 64, n_out: int = 2, seed: int = 0, opset: int = 17) -> bytes:
    """Bytes of an ONNX MLP ``n_in -> hidden -> hidden -> n_out`` with ReLU and softmax.

    Input ``x`` (float32, ``[N, n_in]``), output ``probabilities`` (float32, ``[N, n_out]``).
    The same arguments always give the same bytes (the bundled model is ``make_mlp_onnx()``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [n_in, hidden, hidden, n_out]
    inits, nodes = [], []
    cur = "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [f"h{i}"]))
        cur = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Softmax", [cur], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "daskinfer_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="daskinfer")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bundled_model_path() -> str:
    """Path of the small MLP shipped with daskinfer (16 float32 inputs -> 2 probabilities)."""
    return os.path.join(os.path.dirname(__file__), "data", "mlp.onnx")


def run_onnx_directly(model: str | bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX model with a plain onnxruntime session: the reference for tests."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def negate_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stage function for examples and tests: every column negated (``daskinfer.testing:negate_columns``)."""
    return {k: -v for k, v in columns.items()}


def all_finite(columns: dict[str, np.ndarray]) -> np.ndarray:
    """A filter for examples and tests: rows whose every numeric column value is finite."""
    ok = None
    for v in columns.values():
        if v.dtype.kind in "fc":
            row_ok = np.isfinite(v).reshape(len(v), -1).all(axis=1)
            ok = row_ok if ok is None else ok & row_ok
    return ok if ok is not None else np.ones(len(next(iter(columns.values()))), dtype=bool)


def random_rows(n: int, n_in: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` rows of float32 inputs for the bundled model."""
    return np.random.default_rng(seed).standard_normal((n, n_in)).astype(np.float32)


def collect_results(client: Any, n: int, timeout: float = 60.0) -> list[Any]:
    """The next ``n`` results of requests sent with ``InferenceClient.send``, in arrival order.

    Returns early (with fewer) when ``timeout`` seconds pass, so a test can say what is missing.
    """
    import time

    out: list[Any] = []
    deadline = time.monotonic() + timeout
    for result in client.results(timeout=timeout):
        out.append(result)
        if len(out) >= n or time.monotonic() > deadline:
            break
    return out


def send_rows_and_blocks(
    client: Any, n: int, keys: int = 7, big_block: int = 2000, seed: int = 0
) -> tuple[dict[str, tuple[np.ndarray, bool]], dict[str, list[str]]]:
    """Send ``n`` requests with ``InferenceClient.send``: single rows, and every tenth a block (of
    1 to 16 rows, every thousandth of ``big_block`` rows), with ``keys`` keys in turn.

    Returns ``sent`` (request id -> ``(inputs, batched)``, for :func:`check_outputs`) and
    ``order`` (key -> ids as sent, for :func:`check_key_order`).
    """
    rng = np.random.default_rng(seed)
    sent: dict[str, tuple[np.ndarray, bool]] = {}
    order: dict[str, list[str]] = {}
    for i in range(n):
        key = f"k{i % keys}"
        if i % 10 == 0:
            block = random_rows(big_block if i % 1000 == 0 else int(rng.integers(1, 17)), seed=i)
            rid = client.send(block, batched=True, key=key)
            sent[rid] = (block, True)
        else:
            row = random_rows(1, seed=i)[0]
            rid = client.send(row, key=key)
            sent[rid] = (row, False)
        order.setdefault(key, []).append(rid)
    return sent, order


def check_rows_and_blocks(client: Any, n: int, model: str | bytes) -> list[Any]:
    """Send ``n`` rows and blocks (:func:`send_rows_and_blocks`) and two requests with futures
    through an ``InferenceClient``; assert that each is answered exactly once, with the ONNX
    ``model``'s output run directly, and in request order per key.  Returns the ``n`` results."""
    sent, order = send_rows_and_blocks(client, n)
    one = client.submit(random_rows(1, seed=99)[0])  # futures work too
    five = client.submit_many(random_rows(5, seed=98))
    results = collect_results(client, n)
    assert one.result(30).ok and len(five.result(30).value()) == 5
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)) == n and set(ids) == set(sent), "every request answered exactly once"
    assert client.duplicates == 0
    check_outputs({r.id: r for r in results}, sent, model)
    check_key_order(results, order)
    return results


def check_outputs(
    results_by_id: dict[str, Any],
    sent: dict[str, tuple[np.ndarray, bool]],
    model: str | bytes,
    input_name: str = "x",
    output: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert that each request's answer equals the ONNX model run directly on its rows.

    ``sent`` maps request id to ``(inputs, batched)``: one row, or a block of rows.
    """
    rows = np.concatenate([x if batched else x[None] for x, batched in sent.values()])
    want = run_onnx_directly(model, {input_name: rows})
    want_out = want[output] if output else next(iter(want.values()))
    got = np.concatenate(
        [
            results_by_id[rid].value() if batched else results_by_id[rid].value()[None]
            for rid, (_, batched) in sent.items()
        ]
    )
    np.testing.assert_allclose(got, want_out, rtol=rtol, atol=atol)


def check_key_order(results: list[Any], order: dict[str, list[str]]) -> None:
    """Assert that results of each key arrived in request order (``order``: key -> ids as sent)."""
    arrival: dict[Any, list[str]] = {}
    for r in results:
        arrival.setdefault(r.key, []).append(r.id)
    for key, ids_in_order in order.items():
        assert arrival.get(key, []) == ids_in_order, f"key {key} answered out of order"


__all__: list[Any] = [
    "bundled_model_path",
    "check_key_order",
    "check_outputs",
    "check_rows_and_blocks",
    "collect_results",
    "make_mlp_onnx",
    "negate_columns",
    "all_finite",
    "random_rows",
    "run_onnx_directly",
    "send_rows_and_blocks",
]
