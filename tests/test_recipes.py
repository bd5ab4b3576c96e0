"""Framework recipes end to end on the session cluster: a scikit-learn pipeline (scaler +
classifier), XGBoost and LightGBM, each deployed as a PythonModel and as an OnnxModel made by
daskinfer.convert.to_onnx, scored with daskinfer.predict; outputs equal the framework's own
predict_proba.  PyTorch export runs only where torch is installed (CI does not install it: it is
large)."""

from __future__ import annotations

import io

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from optional import require

import daskinfer
from daskinfer import OnnxModel, PythonModel, deploy, undeploy
from daskinfer.exceptions import ConversionError

N_FEATURES = 16
FEATURES = [f"f{i}" for i in range(N_FEATURES)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3_000, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] > 0).astype(np.int64)
    return x, y


def _sklearn_pipeline(x, y):
    require("sklearn", "scikit-learn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)


def _xgboost(x, y):
    xgb = require("xgboost", "xgboost-cpu")
    return xgb.XGBClassifier(n_estimators=30, max_depth=4, n_jobs=1).fit(x, y)


def _lightgbm(x, y):
    lgb = require("lightgbm", "lightgbm")
    return lgb.LGBMClassifier(n_estimators=30, num_leaves=15, n_jobs=1, verbose=-1).fit(x, y)


TRAIN = {"sklearn-pipeline": _sklearn_pipeline, "xgboost": _xgboost, "lightgbm": _lightgbm}


@pytest.mark.parametrize("kind", ["python", "onnx"])
@pytest.mark.parametrize("framework", list(TRAIN))
def test_recipe_scores_equal_predict_proba(client, data, framework, kind):
    x, y = data
    estimator = TRAIN[framework](x, y)
    name = f"{framework}-{kind}"
    if kind == "python":
        model = PythonModel(name, estimator.predict_proba)  # the estimator travels with its bound method
    else:
        require("skl2onnx", "daskinfer[convert]")
        require("onnxmltools", "daskinfer[convert]")
        onnx_bytes, report = daskinfer.convert.to_onnx(estimator, x[:500])
        assert report.rows_compared == 500 and report.onnx_rows_s > 0 and report.framework_rows_s > 0
        assert report.faster in ("onnx", report.framework)
        model = OnnxModel(name, onnx_bytes)
    deploy(client, model)
    try:
        ddf = dd.from_pandas(pd.DataFrame(x, columns=FEATURES), npartitions=3)
        output = "output" if kind == "python" else "probabilities"
        got = daskinfer.predict(ddf, name, output=output).compute()
    finally:
        undeploy(client, name)
    np.testing.assert_allclose(got.to_numpy(dtype=np.float64), estimator.predict_proba(x), rtol=1e-4, atol=1e-5)


def test_to_onnx_names_the_largest_difference(data):
    require("skl2onnx", "daskinfer[convert]")
    x, y = data
    pipeline = _sklearn_pipeline(x, y)
    # float32 ONNX against float64 scikit-learn differs in the last bits: no tolerance at all fails
    with pytest.raises(
        ConversionError,
        match=r"output 'probabilities' differs from Pipeline.predict_proba"
        r".*largest difference [0-9.e-]+ at \[\d+, \d\]",
    ) as info:
        daskinfer.convert.to_onnx(pipeline, x[:200], rtol=0, atol=0)
    assert info.value.output == "probabilities" and 0 < info.value.max_difference < 1e-5


def test_to_onnx_report_and_file(data, tmp_path):
    require("skl2onnx", "daskinfer[convert]")
    x, y = data
    path = tmp_path / "clf.onnx"
    onnx_bytes, report = daskinfer.convert.to_onnx(_sklearn_pipeline(x, y), x[:100], path=path, target_opset=15)
    assert path.read_bytes() == onnx_bytes
    assert report.inputs == ["x: float32[N, 16]"] and report.outputs == ["label", "probabilities"]
    text = str(report)
    assert "outputs match on 100 sample rows" in text and "faster here" in text and "opset 15" in text


def test_to_onnx_refuses_what_it_cannot_convert(data):
    x, _ = data
    with pytest.raises(ConversionError, match="cannot convert a builtins.object.*torch.onnx.export"):
        daskinfer.convert.to_onnx(object(), x[:10])


def test_pytorch_export_recipe(client, data):
    torch = pytest.importorskip("torch", reason="torch is not installed (deliberately not in CI: it is large)")
    x, _ = data
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2), torch.nn.Softmax(dim=1)
    ).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net,
        torch.zeros(1, N_FEATURES),
        buf,
        input_names=["x"],
        output_names=["probabilities"],
        dynamic_axes={"x": {0: "N"}, "probabilities": {0: "N"}},
    )
    deploy(client, OnnxModel("torch-mlp", buf.getvalue()))
    try:
        got = daskinfer.predict(dd.from_pandas(pd.DataFrame(x, columns=FEATURES), npartitions=2), "torch-mlp").compute()
    finally:
        undeploy(client, "torch-mlp")
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-4, atol=1e-5)
