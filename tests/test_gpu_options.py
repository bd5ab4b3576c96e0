"""GPU options that can be checked without a GPU: execution providers and their options, the
device a worker's GPU gets, I/O binding, worker resources on model specs, batch sizes per stage and
per model, and the device a class model's ``load`` receives.

Provider availability is the real onnxruntime's list of this install; where a test needs CUDA to
be available (the device id a GPU provider gets), it passes that list, the stand-in for the GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from daskinfer import OnnxModel, PythonModel
from daskinfer.cli.app import build_model
from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.models.device import (
    call_load,
    check_resources,
    device_memory,
    device_of,
    merge_resources,
    missing_resources,
    visible_device,
)
from daskinfer.models.onnx_providers import check_providers, check_used, session_providers
from daskinfer.testing import random_rows, run_onnx_directly

AVAILABLE = ort.get_available_providers()
KNOWN = ort.get_all_providers()
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
needs_no_cuda = pytest.mark.skipif(CUDA in AVAILABLE, reason="this onnxruntime has CUDA (onnxruntime-gpu)")


@needs_no_cuda
def test_a_provider_this_onnxruntime_lacks_is_refused_naming_it_and_the_available_ones(mlp_path):
    with pytest.raises(ConfigError) as e:
        OnnxModel("big", mlp_path, providers=[CUDA])
    msg = str(e.value)
    assert f"model 'big': execution providers ['{CUDA}'] are not available in this onnxruntime" in msg
    assert f"available: {AVAILABLE}" in msg and "daskinfer[gpu]" in msg


@needs_no_cuda
def test_the_cpu_is_a_fallback_only_where_the_list_names_it(mlp_path):
    model = OnnxModel("big", mlp_path, providers=[CUDA, CPU])  # CUDA where a worker has it, else the CPU
    loaded = model.load(device="cuda:0")
    try:
        assert loaded.providers == [CPU] and loaded.device == "cpu", "runs on the CPU, and says so"
        rows = random_rows(8)
        expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        np.testing.assert_allclose(loaded.predict({"x": rows})["probabilities"], expected, rtol=1e-6)
    finally:
        loaded.close()


def test_provider_checks_name_what_was_expected():
    with pytest.raises(ConfigError, match=r"onnxruntime knows no provider of that name"):
        check_providers("m", ["CudaProvider"], None, AVAILABLE, KNOWN)
    with pytest.raises(ConfigError, match=r"providers must be a non-empty list"):
        check_providers("m", "CPUExecutionProvider", None, AVAILABLE, KNOWN)
    with pytest.raises(ConfigError, match=r"one dict per provider \(2 for"):
        check_providers("m", [CUDA, CPU], [{}], AVAILABLE, KNOWN)
    names, options = check_providers(
        "m", ["TensorrtExecutionProvider", CPU], [{"trt_fp16_enable": True, "device_id": 1}, {}], AVAILABLE, KNOWN
    )
    assert options == [{"trt_fp16_enable": "1", "device_id": "1"}, {}], "values as onnxruntime reads them"


def test_a_gpu_provider_runs_on_the_workers_device_unless_its_options_name_one():
    with_cuda = [CUDA, "TensorrtExecutionProvider", CPU]  # the stand-in for a machine with onnxruntime-gpu
    names, options = session_providers("m", [CUDA, CPU], [{}, {}], with_cuda, "cuda:0", "w")
    assert names == [CUDA, CPU] and options == [{"device_id": "0"}, {}]
    _, options = session_providers("m", ["TensorrtExecutionProvider"], [{"device_id": "2"}], with_cuda, "cuda:0", "w")
    assert options == [{"device_id": "2"}]
    # a worker without CUDA: refused naming what it has, unless the CPU is listed as a fallback
    with pytest.raises(ModelLoadError, match=rf"\['{CUDA}'\] are not available in onnxruntime on worker w; available"):
        session_providers("m", [CUDA], [{}], [CPU], "cuda:0", "worker w")
    assert session_providers("m", [CUDA, CPU], [{}, {}], [CPU], "cuda:0", "w") == ([CPU], [{}])


def test_a_session_that_fell_back_to_the_cpu_fails_unless_the_cpu_is_listed():
    with pytest.raises(ModelLoadError, match=rf"could not start {CUDA} .* it could start only \['{CPU}'\]"):
        check_used("m", [CUDA], [CPU], "worker w")
    check_used("m", [CUDA, CPU], [CPU], "worker w")  # allowed: a warning
    check_used("m", [CUDA], [CUDA, CPU], "worker w")


def test_io_binding_gives_onnxruntimes_outputs(mlp_path):
    loaded = OnnxModel("bound", mlp_path, io_binding=True).load()
    try:
        assert loaded.describe()["io_binding"] is True
        rows = random_rows(300, seed=2)
        expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
        np.testing.assert_allclose(loaded.predict({"x": rows})["probabilities"], expected, rtol=1e-6)
    finally:
        loaded.close()
    with pytest.raises(ConfigError, match="io_binding must be true or false, got 'yes'"):
        OnnxModel("bound", mlp_path, io_binding="yes")  # type: ignore[arg-type]


def test_the_device_of_a_worker_and_its_memory():
    assert device_of({"GPU": 1}) == "cuda:0" and device_of({"GPU": 0.5}) == "cuda:0"
    assert device_of({}) == "cpu" and device_of({"memory": 4e9}) == "cpu"
    assert device_memory("cpu") is None
    # device 0 of a worker that sees GPU 3 only (dask-cuda) is GPU 3; UUIDs are kept
    assert visible_device(0, "3") == 3 and visible_device(1, "2,3") == 3 and visible_device(0, None) == 0
    assert visible_device(0, "GPU-5d6f") == "GPU-5d6f" and visible_device(1, "0") is None


def test_resources_are_checked_where_the_spec_is_made(mlp_path):
    assert OnnxModel("a", mlp_path, resources={"GPU": 1}).resources == {"GPU": 1.0}
    assert PythonModel("b", lambda x: x, resources={"GPU": 2, "memory": 1e9}).resources == {"GPU": 2.0, "memory": 1e9}
    for bad in ({"GPU": 0}, {"GPU": "one"}, {"": 1}, "GPU=1", {"GPU": True}):
        with pytest.raises(ConfigError, match=r"model 'c': resources must"):
            OnnxModel("c", mlp_path, resources=bad)  # type: ignore[arg-type]
    assert check_resources("d", None) == {}
    assert merge_resources({"GPU": 1}, {"GPU": 2, "x": 1}, {}) == {"GPU": 2.0, "x": 1.0}
    assert missing_resources({"GPU": 1.0}, {"GPU": 2.0, "x": 1.0}) == {"GPU": 2.0, "x": 1.0}
    assert missing_resources({"GPU": 2.0}, {"GPU": 1.0}) == {}


def test_resources_default_to_the_dask_config(mlp_path):
    import dask

    with dask.config.set({"daskinfer.models.resources": {"GPU": 1}}):
        assert OnnxModel("a", mlp_path).resources == {"GPU": 1.0}
        assert OnnxModel("a", mlp_path, resources={}).resources == {}, "a model's own resources win"


def test_a_deployment_file_names_the_entry_with_bad_resources_or_a_missing_provider(tmp_path):
    with pytest.raises(ConfigError, match=r"^f.yaml: models\[0\]: model 'g': resources must be a mapping"):
        build_model(
            {"kind": "onnx", "name": "g", "path": "bundled", "resources": "GPU"}, str(tmp_path), "f.yaml: models[0]"
        )
    if CUDA not in AVAILABLE:
        with pytest.raises(ConfigError, match=rf"^f.yaml: models\[1\]: .*\['{CUDA}'\] are not available.*available: "):
            build_model(
                {"kind": "onnx", "name": "g", "path": "bundled", "providers": [CUDA]},
                str(tmp_path),
                "f.yaml: models[1]",
            )
    (tmp_path / "m.py").write_text("def predict(x):\n    return x\n")
    entry = {"kind": "python", "name": "p", "directory": ".", "module": "m", "resources": {"GPU": 1}}
    assert build_model(entry, str(tmp_path), "f.yaml: models[2]").resources == {"GPU": 1.0}


def test_a_class_models_load_receives_the_device_when_it_takes_one():
    seen = []

    class Takes:
        def load(self, device):
            seen.append(("positional", device))

    class KeywordOnly:
        def load(self, *, device="cpu"):
            seen.append(("keyword", device))

    class Plain:
        def load(self):
            seen.append(("none", None))

    class Defaulted:
        def load(self, path="weights.bin"):
            seen.append(("default", path))

    for cls in (Takes, KeywordOnly, Plain, Defaulted):
        call_load(cls(), "cuda:0")
    assert seen == [("positional", "cuda:0"), ("keyword", "cuda:0"), ("none", None), ("default", "weights.bin")]
    probe = PythonModel("probe", __import__("gpu_models").DeviceProbe).load(device="cuda:0")
    assert probe.predict(np.zeros((2, 1), np.float32))["output"].tolist() == ["cuda:0", "cuda:0"]
    assert probe.describe() == {"device": "cuda:0"}
