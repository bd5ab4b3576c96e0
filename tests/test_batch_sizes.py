"""Batch sizes per infer stage and per model: a stage cuts larger batches into calls of its limit
(the model sees no larger call), and a pipeline that sets no ``max_batch_size`` of its own forms
batches as large as its largest stage asks for, resolved on the deploying client."""

from __future__ import annotations

import numpy as np
import pytest

from daskinfer import OnnxModel, Pipeline, PythonModel
from daskinfer.exceptions import ConfigError
from daskinfer.models.registry import ModelRegistry
from daskinfer.testing import random_rows, run_onnx_directly


def test_a_pipeline_forms_batches_as_large_as_its_largest_stage_asks_unless_it_sets_its_own(mlp_path):
    big = OnnxModel("big", mlp_path, max_batch_size=16384)
    st = Pipeline(inbox="b").infer(big).infer("small").resolve().settings
    assert (st.max_batch_size, st.model_batch_size) == (16384, 4096), "the other stages keep 4096-row calls"
    st = Pipeline(inbox="b").infer("small", max_batch_size=10000).resolve().settings
    assert st.max_batch_size == 10000
    st = Pipeline(inbox="b", max_batch_size=1000).infer(big).resolve().settings
    assert (st.max_batch_size, st.model_batch_size) == (1000, 1000), "the pipeline's own setting wins"
    # a model named by string: what deploy recorded of it
    st = Pipeline(model="named", inbox="b").resolve({"named": {"resources": {"GPU": 1}, "max_batch_size": 9000}})
    assert st.settings.max_batch_size == 9000 and st.resources == {"GPU": 1.0}
    spec = Pipeline(inbox="b").infer(big).infer(OnnxModel("g", mlp_path, resources={"GPU": 2, "x": 1})).resolve()
    assert spec.resources == {"GPU": 2.0, "x": 1.0}
    with pytest.raises(ConfigError, match=r"max_batch_size must be an integer >= 1, got 0"):
        Pipeline().infer("m", max_batch_size=0)
    with pytest.raises(ConfigError, match=r"model 'm': max_batch_size must be an integer >= 1, got 2.5"):
        OnnxModel("m", mlp_path, max_batch_size=2.5)  # type: ignore[arg-type]


def test_a_model_specs_max_batch_size_cuts_its_calls_in_process(mlp_path):
    import gpu_models

    model = PythonModel("sized", gpu_models.SizedMLP, max_batch_size=64, sample=random_rows(1))
    rows = random_rows(300, seed=9)
    out = Pipeline(inbox="in-process").infer(model).run({"x": rows}, registry=ModelRegistry())  # one batch
    assert out["call_rows"].tolist() == [64] * 256 + [44] * 44, "calls of 64 rows, then the rest"
    expected = run_onnx_directly(mlp_path, {"x": rows})["probabilities"]
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)
