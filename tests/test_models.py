"""Models in this process (no cluster): ONNX and Python models give the right outputs,
and every way to get them wrong gives an error that names the model, input or file."""

from __future__ import annotations

import pickle
import sys

import dask
import numpy as np
import pandas as pd
import pytest

from daskinfer import OnnxModel, PythonModel, TensorSpec
from daskinfer.exceptions import (
    ConfigError,
    InputValidationError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    OutputCountError,
    RemoteModelError,
    ResultError,
)
from daskinfer.models.registry import ModelRegistry, load_deployment
from daskinfer.testing import random_rows, run_onnx_directly


@pytest.fixture(scope="module")
def mlp(mlp_path):
    return OnnxModel("mlp", mlp_path).load()


# -- ONNX --------------------------------------------------------------------------------------


def test_onnx_from_path_equals_onnxruntime(mlp, mlp_path):
    x = random_rows(64, seed=1)
    out = mlp.predict(x)
    want = run_onnx_directly(mlp_path, {"x": x})
    assert set(out) == {"probabilities"}
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], rtol=1e-6, atol=1e-7)
    # a dict keyed by input name works the same
    np.testing.assert_allclose(mlp.predict({"x": x})["probabilities"], want["probabilities"], rtol=1e-6, atol=1e-7)


def test_onnx_from_bytes_equals_onnxruntime(mlp_path):
    with open(mlp_path, "rb") as f:
        data = f.read()
    model = OnnxModel("mlp-bytes", data)
    assert model.path is None
    x = random_rows(7, seed=2)
    np.testing.assert_allclose(
        model.load().predict(x)["probabilities"],
        run_onnx_directly(data, {"x": x})["probabilities"],
        rtol=1e-6,
        atol=1e-7,
    )


def test_onnx_one_row_and_large_batch(mlp, mlp_path):
    for n in (1, 4096):
        x = random_rows(n, seed=n)
        np.testing.assert_allclose(
            mlp.predict(x)["probabilities"],
            run_onnx_directly(mlp_path, {"x": x})["probabilities"],
            rtol=1e-6,
            atol=1e-7,
        )


def test_onnx_tensor_specs_are_read_from_the_model(mlp):
    assert mlp.inputs == [TensorSpec("x", np.dtype("float32"), (None, 16))]
    assert mlp.outputs == [TensorSpec("probabilities", np.dtype("float32"), (None, 2))]
    assert mlp.inputs[0].describe() == "x: float32[N, 16]"
    assert mlp.input_names == ["x"] and mlp.output_names == ["probabilities"]


@pytest.mark.parametrize(
    "batch, input_name, match",
    [
        pytest.param(
            random_rows(4).astype(np.float64),
            "x",
            r"model 'mlp': input 'x' expects dtype float32, got float64",
            id="dtype",
        ),
        pytest.param(
            random_rows(4)[:, :15], "x", r"model 'mlp': input 'x' expects shape \[N, 16\], got \[4, 15\]", id="shape"
        ),
        pytest.param(
            random_rows(1)[0], "x", r"model 'mlp': input 'x' expects shape \[N, 16\], got \[16\]", id="no row dim"
        ),
        pytest.param(
            {"y": random_rows(4), "z": random_rows(4)},
            "x",
            r"model 'mlp': missing input 'x'; expected inputs \['x: float32\[N, 16\]'\], got \['y', 'z'\]",
            id="missing",
        ),
        pytest.param(
            {"x": random_rows(4), "y": random_rows(4)},
            "y",
            r"model 'mlp': unexpected input 'y'; expected inputs \['x'\]",
            id="extra",
        ),
        pytest.param(
            np.float32(1.0),
            "x",
            r"model 'mlp': input 'x' is a scalar; expected an array with a row dimension",
            id="scalar",
        ),
        pytest.param(
            np.zeros((0, 16), np.float32), "x", r"model 'mlp' got an empty batch: input 'x' has 0 rows", id="empty"
        ),
    ],
)
def test_onnx_bad_inputs_raise_input_validation_error(mlp, batch, input_name, match):
    with pytest.raises(InputValidationError, match=match) as info:
        mlp.predict(batch)
    assert info.value.model == "mlp"
    assert info.value.input_name == input_name


def test_corrupt_onnx_file_raises_model_load_error_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"this is not an onnx model" * 10)
    model = OnnxModel("broken", path)
    for call in (model.load, model.validate):
        with pytest.raises(ModelLoadError, match="cannot be loaded by onnxruntime") as info:
            call()
        assert str(path) in str(info.value)
        assert "'broken'" in str(info.value)
        assert info.value.path == str(path) and info.value.model == "broken"


def test_missing_onnx_file_raises_model_load_error_naming_the_path(tmp_path):
    path = str(tmp_path / "nowhere" / "missing.onnx")
    with pytest.raises(ModelLoadError, match="cannot read ONNX model file") as info:
        OnnxModel("missing", path)
    assert path in str(info.value) and "'missing'" in str(info.value)
    assert info.value.path == path


def test_unknown_execution_provider_raises_config_error(mlp_path):
    with pytest.raises(
        ConfigError, match=r"model 'mlp': execution providers \['NoSuchExecutionProvider'\] are not available"
    ):
        OnnxModel("mlp", mlp_path, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])


def test_bad_graph_optimization_level_raises_config_error(mlp_path):
    with pytest.raises(ConfigError, match=r"model 'mlp': graph_optimization_level must be one of .* got 'turbo'"):
        OnnxModel("mlp", mlp_path, graph_optimization_level="turbo")


@pytest.mark.parametrize("name", ["", "a:b", None])
def test_bad_model_name_raises_config_error(mlp_path, name):
    with pytest.raises(ConfigError, match="model name must be a plain name"):
        OnnxModel(name, mlp_path)


# -- Python models -----------------------------------------------------------------------------


def test_python_callable():
    model = PythonModel("double", lambda x: x * 2).load()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = model.predict(x)
    assert set(out) == {"output"}
    np.testing.assert_array_equal(out["output"], x * 2)


def test_python_declared_inputs_are_checked():
    model = PythonModel("sum", lambda x: x.sum(axis=1), inputs={"x": ("float32", (None, 3))}).load()
    np.testing.assert_array_equal(model.predict(np.ones((2, 3), np.float32))["output"], [3.0, 3.0])
    with pytest.raises(InputValidationError, match=r"model 'sum': input 'x' expects dtype float32, got int64"):
        model.predict(np.ones((2, 3), np.int64))
    with pytest.raises(InputValidationError, match=r"model 'sum': input 'x' expects shape \[N, 3\], got \[2, 4\]"):
        model.predict(np.ones((2, 4), np.float32))


def test_python_inputs_with_different_row_counts_are_rejected():
    model = PythonModel("two", lambda b: b["a"] + b["b"], batch_format="dict").load()
    with pytest.raises(InputValidationError, match=r"model 'two': inputs have different numbers of rows") as info:
        model.predict({"a": np.ones(3), "b": np.ones(4)})
    assert info.value.input_name == "b"


def test_multi_input_model_needs_a_dict():
    model = PythonModel("two", lambda b: b["a"], inputs=["a", "b"], batch_format="dict").load()
    with pytest.raises(InputValidationError, match=r"model 'two' has 2 inputs \['a', 'b'\]; pass a dict"):
        model.predict(np.ones(3))


class CountingModel:
    """A class with load()/predict(): load must run once per instance, before predict."""

    created: list[CountingModel] = []

    def __init__(self):
        self.loads = 0
        self.weights = None
        CountingModel.created.append(self)

    def load(self):
        self.loads += 1
        self.weights = np.array([1.0, 2.0, 3.0])

    def predict(self, x):
        return x @ self.weights


def test_python_class_with_load_and_predict_loads_once_per_instance():
    CountingModel.created.clear()
    model = PythonModel("counting", CountingModel, instances=2)
    dep = load_deployment(model)
    try:
        assert len(CountingModel.created) == 2
        x = np.arange(9, dtype=np.float64).reshape(3, 3)
        for _ in range(5):
            np.testing.assert_allclose(dep.predict(x)["output"], x @ [1.0, 2.0, 3.0])
        assert [m.loads for m in CountingModel.created] == [1, 1]
        assert {id(i.fn.__self__) for i in dep.instances} == {id(m) for m in CountingModel.created}
    finally:
        dep.retire()


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def predict(self, x):
        return x * self.factor


def test_python_instance_with_predict():
    model = PythonModel("scaler", Scaler(3.0)).load()
    np.testing.assert_allclose(model.predict(np.ones((2, 2)))["output"], np.full((2, 2), 3.0))


def test_python_scikit_learn_estimator_instance():
    sklearn_linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is not installed")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    clf = sklearn_linear.LogisticRegression().fit(X, y)
    model = PythonModel("logreg", clf).load()
    np.testing.assert_array_equal(model.predict(X)["output"], clf.predict(X))


def test_python_batch_format_list_gets_one_item_per_row():
    seen = []

    def handle(rows):
        seen.append(rows)
        return [float(r.sum()) for r in rows]

    model = PythonModel("listy", handle, batch_format="list").load()
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.testing.assert_array_equal(model.predict(x)["output"], [1.0, 5.0, 9.0])
    assert isinstance(seen[0], list) and len(seen[0]) == 3


def test_python_batch_format_list_with_dict_rows_and_dict_results():
    def handle(rows):
        return [{"total": r["a"] + r["b"], "diff": r["a"] - r["b"]} for r in rows]

    model = PythonModel("listdict", handle, batch_format="list").load()
    out = model.predict({"a": np.array([5, 7]), "b": np.array([1, 2])})
    np.testing.assert_array_equal(out["total"], [6, 9])
    np.testing.assert_array_equal(out["diff"], [4, 5])


def test_python_batch_format_pandas():
    def handle(frame):
        assert isinstance(frame, pd.DataFrame)
        return frame.sum(axis=1)

    model = PythonModel("frame", handle, batch_format="pandas").load()
    x = np.arange(8, dtype=np.float64).reshape(4, 2)
    np.testing.assert_allclose(model.predict(x)["output"], x.sum(axis=1))
    # several inputs become columns
    out = model.predict({"a": np.array([1.0, 2.0]), "b": np.array([10.0, 20.0])})
    np.testing.assert_allclose(out["output"], [11.0, 22.0])


def test_python_batch_format_dict_and_named_outputs():
    def handle(block):
        assert isinstance(block, dict) and set(block) == {"x"}
        return block["x"].min(axis=1), block["x"].max(axis=1)

    model = PythonModel("minmax", handle, batch_format="dict", outputs=["lo", "hi"]).load()
    x = np.array([[3, 1, 2], [9, 8, 7]])
    out = model.predict({"x": x})
    np.testing.assert_array_equal(out["lo"], [1, 7])
    np.testing.assert_array_equal(out["hi"], [3, 9])


def test_wrong_output_count_raises_output_count_error_naming_both_numbers():
    model = PythonModel("short", lambda x: x[:-1]).load()
    with pytest.raises(OutputCountError, match=r"model 'short' returned 3 results for a batch of 4 rows") as info:
        model.predict(np.ones((4, 2)))
    assert (info.value.model, info.value.n_in, info.value.n_out) == ("short", 4, 3)


def test_object_output_raises_model_error():
    model = PythonModel("objects", lambda x: np.array([object()] * len(x))).load()
    with pytest.raises(ModelError, match=r"model 'objects': output 'output' has dtype object"):
        model.predict(np.ones((2, 2)))


def test_bad_python_model_arguments_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model 'x': give exactly one of predict= or directory="):
        PythonModel("x")
    with pytest.raises(ConfigError, match="model 'x': give exactly one of predict= or directory="):
        PythonModel("x", lambda b: b, directory=tmp_path, module="h")
    with pytest.raises(ConfigError, match=r"model 'x': batch_format must be one of .* got 'arrow'"):
        PythonModel("x", lambda b: b, batch_format="arrow")
    with pytest.raises(ConfigError, match="model 'x': predict= must be callable or have a predict"):
        PythonModel("x", 42)
    with pytest.raises(ConfigError, match="model 'x': directory= needs module="):
        PythonModel("x", directory=tmp_path)


def test_class_whose_load_fails_raises_model_load_error():
    class Broken:
        def load(self):
            raise RuntimeError("weights.bin is missing")

        def predict(self, x):
            return x

    with pytest.raises(ModelLoadError, match=r"model 'broken': load\(\) failed: RuntimeError: weights.bin is missing"):
        PythonModel("broken", Broken).load()


# -- registry in this process ------------------------------------------------------------------


def test_failed_warmup_raises_model_load_error():
    def predict(x):
        if not x.any():
            raise ZeroDivisionError("all-zero batch")
        return x

    model = PythonModel("fragile", predict, inputs={"x": ("float32", (None, 2))}, warmup=True)
    with pytest.raises(
        ModelLoadError, match=r"model 'fragile' version '1' failed its warm-up batch: ZeroDivisionError"
    ):
        load_deployment(model)


def test_registry_get_unknown_model_lists_deployed_models(mlp_path):
    reg = ModelRegistry()
    reg.install_sync(OnnxModel("mlp", mlp_path))
    try:
        with pytest.raises(ModelNotFoundError, match=r"model 'nope' is not deployed here; deployed models: \['mlp'\]"):
            reg.get("nope")
    finally:
        reg.close()
    with pytest.raises(ModelNotFoundError, match="deployed models: none"):
        reg.get("mlp")


@pytest.mark.parametrize(
    "exc",
    [
        ModelNotFoundError("mlp", ["other"]),
        OutputCountError("mlp", 4, 3, output="probabilities"),
        InputValidationError("bad input", model="mlp", input_name="x", request_id="r1"),
        ModelLoadError("cannot load", model="mlp", path="/models/mlp.onnx"),
        ModelError("failed", model="mlp", version="2"),
        ResultError("request r1 failed", error_type="ModelError", request_id="r1"),
        RemoteModelError("HTTP 500", service="http://127.0.0.1:1", call="ModelInfer", model="mlp", fault="server"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(exc):
    # errors raised on workers reach the client by pickle: type, message and fields must survive
    out = pickle.loads(pickle.dumps(exc))
    assert type(out) is type(exc)
    assert str(out) == str(exc)
    assert vars(out) == vars(exc)


# -- config at call time -----------------------------------------------------------------------


def test_onnx_threads_and_providers_follow_dask_config(mlp_path):
    with dask.config.set({"daskinfer.onnx.intra-op-num-threads": 2, "daskinfer.onnx.inter-op-num-threads": 3}):
        model = OnnxModel("mlp", mlp_path)
    assert (model.intra_op_num_threads, model.inter_op_num_threads) == (2, 3)
    so = model.session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 3)
    # an explicit argument wins over the config; the default applies again outside the block
    assert OnnxModel("mlp", mlp_path, intra_op_num_threads=4).intra_op_num_threads == 4
    assert OnnxModel("mlp", mlp_path).intra_op_num_threads == 1
    with dask.config.set({"daskinfer.onnx.providers": ["NoSuchExecutionProvider"]}):
        with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
            OnnxModel("mlp", mlp_path)


def test_the_inline_path_never_waits_on_the_event_loop_for_an_instance_a_thread_holds():
    """A small batch runs inline on the event loop only with an instance in hand.

    A thread keeps taking the only instance, and each of its calls holds it until the event
    loop has run once more.  Were the loop ever to wait for the instance (having seen it free,
    then lost it to the thread), neither could go on: the thread's call times out and says so.
    A very short thread switch interval makes that race common (it showed within a few hundred
    iterations before the fix).
    """
    import asyncio
    import threading
    import time

    loop_ran = threading.Event()
    stalls = []
    hammer_thread: list[threading.Thread] = []

    def predict(x):
        if threading.current_thread() in hammer_thread:  # hold the instance until the loop runs
            loop_ran.clear()
            if not loop_ran.wait(
                10.0
            ):  # a loop that waits for the instance never runs again; a busy one does within 10 s
                stalls.append("the event loop stalled waiting for the instance")
        return x

    dep = load_deployment(PythonModel("racy", predict, warmup=False))
    for inst in dep.instances:
        inst.inline_rows = 16  # as a microsecond (ONNX) model has it
    x = np.ones((1, 2))
    stop = threading.Event()

    def hammer():
        while not stop.is_set() and not stalls:
            dep.predict(x)
            time.sleep(0)

    async def main():
        beating = True

        async def heartbeat():
            while beating:
                loop_ran.set()
                await asyncio.sleep(0)

        hb = asyncio.ensure_future(heartbeat())
        hammer_thread.append(threading.Thread(target=hammer))
        hammer_thread[0].start()
        end = time.monotonic() + 4
        n = 0
        while n < 8000 and time.monotonic() < end and not stalls:
            np.testing.assert_array_equal((await dep.apredict(x))["output"], x)
            n += 1
            await asyncio.sleep(0)
        beating = False
        stop.set()
        await asyncio.to_thread(hammer_thread[0].join, 5)
        await hb
        return n

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        n = asyncio.run(main())
    finally:
        sys.setswitchinterval(old)
        dep.retire()
    assert stalls == [] and n > 0


# -- what a new user passes: casting, one input by any name, method=, outputs=, sample= ----------


def test_cast_inputs_takes_float64_rows_and_python_lists_for_a_float32_model(mlp_path):
    x = random_rows(5, seed=4)
    want = run_onnx_directly(mlp_path, {"x": x})["probabilities"]
    model = OnnxModel("mlp", mlp_path, cast_inputs=True).load()
    for given in (x.astype(np.float64), x.tolist(), {"x": x.astype(np.float64).tolist()}):
        np.testing.assert_allclose(model.predict(given)["probabilities"], want, rtol=1e-6, atol=1e-7)
    # never a cast that changes the kind of the values
    with pytest.raises(InputValidationError, match=r"input 'x' expects dtype float32, got <U1"):
        model.predict(np.full((2, 16), "a"))


def test_without_cast_inputs_a_dtype_mismatch_says_how_to_cast(mlp_path):
    with pytest.raises(
        InputValidationError,
        match=r"expects dtype float32, got float64; send float32, or give the model cast_inputs=True",
    ):
        OnnxModel("mlp", mlp_path).load().predict(random_rows(2).astype(np.float64))
    with dask.config.set({"daskinfer.models.cast-inputs": True}):
        model = OnnxModel("mlp", mlp_path)
    assert model.cast_inputs and model.load().predict(random_rows(2).astype(np.float64))["probabilities"].shape == (
        2,
        2,
    )


def test_cast_inputs_for_a_python_model_with_declared_inputs():
    seen = []
    model = PythonModel(
        "sum", lambda x: seen.append(x.dtype) or x.sum(axis=1), inputs={"x": ("float32", (None, 3))}, cast_inputs=True
    ).load()
    np.testing.assert_array_equal(model.predict([[1, 2, 3], [4, 5, 6]])["output"], [6.0, 15.0])
    assert seen == [np.dtype("float32")]


def test_a_one_input_model_takes_a_bare_array_or_a_dict_with_another_name(mlp_path):
    x = random_rows(3, seed=5)
    want = run_onnx_directly(mlp_path, {"x": x})["probabilities"]
    model = OnnxModel("mlp", mlp_path).load()
    for given in (x, {"x": x}, {"X": x}, {"input": x}):
        np.testing.assert_allclose(model.predict(given)["probabilities"], want, rtol=1e-6, atol=1e-7)
    two = PythonModel("two", lambda b: b["a"] + b["b"], inputs=["a", "b"], batch_format="dict").load()
    with pytest.raises(InputValidationError, match=r"model 'two': missing input 'a'"):
        two.predict({"x": np.ones(2), "b": np.ones(2)})  # several inputs: names must match


def test_a_ragged_list_is_an_input_validation_error():
    with pytest.raises(InputValidationError, match=r"model 'm': input 'input' is not a regular array"):
        PythonModel("m", lambda x: x).load().predict([[1.0, 2.0], [3.0]])


@pytest.fixture(scope="module")
def logreg():
    sklearn_linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is not installed")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    return sklearn_linear.LogisticRegression().fit(X, y), X


def test_method_picks_what_an_estimator_runs(logreg):
    clf, X = logreg
    model = PythonModel("clf", clf, method="predict_proba", outputs=["probabilities"]).load()
    out = model.predict(X)
    assert list(out) == ["probabilities"]
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(X))
    np.testing.assert_array_equal(PythonModel("clf", clf).load().predict(X)["output"], clf.predict(X))  # default


def test_method_a_model_lacks_is_refused_before_shipping(logreg):
    clf, _ = logreg
    with pytest.raises(ConfigError, match=r"model 'clf': LogisticRegression has no method 'predict_probability'"):
        PythonModel("clf", clf, method="predict_probability")
    with pytest.raises(ConfigError, match=r"model 'f': method='predict_proba' needs an object or a class"):
        PythonModel("f", lambda x: x, method="predict_proba")
    with pytest.raises(ConfigError, match=r"model 'c': Scaler has no method 'transform'"):
        PythonModel("c", Scaler, method="transform")


def test_method_of_a_class_is_called_on_each_instance():
    class Model:
        def load(self):
            self.k = 10

        def score(self, x):
            return x * self.k

    np.testing.assert_array_equal(
        PythonModel("s", Model, method="score").load().predict(np.ones(2))["output"], [10.0, 10.0]
    )


def test_outputs_selects_and_orders_the_entries_of_a_dict_result():
    fn = lambda x: {"a": x, "b": x * 2, "c": x * 3}  # noqa: E731
    out = PythonModel("sel", fn, outputs=["c", "a"]).load().predict(np.ones(2))
    assert list(out) == ["c", "a"]
    np.testing.assert_array_equal(out["c"], [3.0, 3.0])
    with pytest.raises(
        ModelError, match=r"model 'miss' returned outputs \['a', 'b', 'c'\], without 'z' asked for by outputs="
    ):
        PythonModel("miss", fn, outputs=["a", "z"]).load().predict(np.ones(2))
    with pytest.raises(ConfigError, match="outputs must be a list of distinct output names"):
        PythonModel("dup", fn, outputs=["a", "a"])


def zipmap_classifier() -> bytes:
    """What skl2onnx makes of a classifier by default: a label tensor and a ZipMap (list of dicts)."""
    import onnx
    from onnx import TensorProto, helper

    map_type = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["X"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["output_label"], axis=1, keepdims=0),
            helper.make_node(
                "ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
            ),
        ],
        "zipmap-classifier",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2])],
        [
            helper.make_tensor_value_info("output_label", TensorProto.INT64, ["N"]),
            helper.make_value_info("output_probability", helper.make_sequence_type_proto(map_type)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_zipmap_output_is_refused_at_load_with_the_conversion_option_that_avoids_it():
    model = OnnxModel("clf", zipmap_classifier())
    for call in (model.load, model.validate):
        with pytest.raises(ModelLoadError) as info:
            call()
        msg = str(info.value)
        assert "output 'output_probability' is seq(map(int64,tensor(float)))" in msg
        assert "options={'zipmap': False}" in msg
        assert "outputs=['output_label']" in msg


def test_onnx_outputs_keeps_only_the_outputs_asked_for():
    x = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)
    loaded = OnnxModel("clf", zipmap_classifier(), outputs=["output_label"]).load()
    out = loaded.predict({"input": x})  # the one input by another name
    assert list(out) == ["output_label"]
    np.testing.assert_array_equal(out["output_label"], [1, 0])
    assert [s.name for s in loaded.outputs] == ["output_label"]
    with pytest.raises(
        ModelLoadError,
        match=r"has no output 'proba' asked for by outputs=; its outputs: \['output_label', 'output_probability'\]",
    ):
        OnnxModel("clf", zipmap_classifier(), outputs=["proba"]).validate()


def test_sample_is_the_warm_up_batch_and_a_failing_model_fails_to_load():
    seen = []
    sample = np.arange(8, dtype=np.float32).reshape(2, 4)
    dep = load_deployment(PythonModel("sampled", lambda x: seen.append(x.copy()) or x, sample=sample))
    try:
        assert len(seen) == 1
        np.testing.assert_array_equal(seen[0], sample)
    finally:
        dep.retire()
    with pytest.raises(ModelLoadError, match=r"model 'broken' version '1' failed its warm-up batch: ZeroDivisionError"):
        load_deployment(PythonModel("broken", lambda x: 1 / 0, sample=sample))


def test_deploy_warns_when_a_python_model_cannot_be_run_before_traffic(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="daskinfer"):
        PythonModel("unchecked", lambda x: 1 / 0).validate()
        PythonModel("checked", lambda x: x, sample=np.ones((1, 2))).validate()
        PythonModel("declared", lambda x: x, inputs={"x": ("float32", (None, 2))}).validate()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "model 'unchecked': no sample= and no inputs=" in warned[0]
