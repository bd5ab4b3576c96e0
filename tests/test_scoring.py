"""daskinfer.predict: batch scoring of dask DataFrames, Arrays and parquet on the session cluster."""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskinfer
from daskinfer import PythonModel, deploy, undeploy
from daskinfer.cli import main as cli_main
from daskinfer.exceptions import ConfigError, ModelNotFoundError, ScoringError
from daskinfer.testing import random_rows, run_onnx_directly

FEATURES = [f"f{i}" for i in range(16)]


@pytest.fixture(scope="module")
def rows():
    return random_rows(5_000, seed=3)


@pytest.fixture(scope="module")
def frame(rows):
    df = pd.DataFrame(rows.astype(np.float64), columns=FEATURES)  # float64, as pandas makes them
    df.insert(0, "id", np.arange(len(df)) * 10)
    return df.set_index(pd.Index([f"r{i:05d}" for i in range(len(df))], name="key"))  # sorts as the rows


@pytest.fixture
def python_model(client):
    deployed = []

    def make(name, fn, **kw):
        deploy(client, PythonModel(name, fn, **kw))
        deployed.append(name)

    yield make
    for name in deployed:
        undeploy(client, name)


def _reference(mlp_path, rows):
    return run_onnx_directly(mlp_path, {"x": rows.astype(np.float32)})["probabilities"]


def test_dataframe_scores_equal_onnxruntime(client, mlp_deployed, mlp_path, frame, rows):
    ddf = dd.from_pandas(frame, npartitions=4)
    scores = daskinfer.predict(ddf, "mlp", keep=["id"])
    assert list(scores.columns) == ["id", "probabilities_0", "probabilities_1"]
    assert scores.npartitions == 4
    got = scores.compute()
    assert list(got.index) == list(frame.index)
    np.testing.assert_array_equal(got["id"].to_numpy(), frame["id"].to_numpy())
    np.testing.assert_allclose(
        got[["probabilities_0", "probabilities_1"]].to_numpy(), _reference(mlp_path, rows), atol=1e-6
    )


def test_partitions_run_in_blocks_of_max_batch_size(client, python_model, frame):
    # the model reports the size of each call it gets: blocks, never one row at a time
    python_model("sizes", lambda x: np.full(len(x), len(x)))
    got = daskinfer.predict(dd.from_pandas(frame, npartitions=2), "sizes", max_batch_size=1000).compute()
    sizes = got["output"].to_numpy()
    assert sizes.max() == 1000
    assert sizes.min() == 500  # 2,500 rows per partition: 1000 + 1000 + 500
    assert (sizes == 1000).sum() == 4000


def test_array_gives_an_array_of_the_chosen_output(client, mlp_deployed, mlp_path, rows):
    x = da.from_array(rows, chunks=1_200)
    probs = daskinfer.predict(x, "mlp")
    assert isinstance(probs, da.Array)
    assert probs.shape == (len(rows), 2) and probs.chunks[0] == x.chunks[0]
    np.testing.assert_allclose(probs.compute(), _reference(mlp_path, rows), atol=1e-6)


def test_array_needs_output_when_the_model_has_several(client, python_model, rows):
    python_model("two", lambda x: {"a": x[:, 0], "b": x[:, 1]})
    x = da.from_array(rows, chunks=2_000)
    with pytest.raises(ConfigError, match=r"gives 2 outputs \['a', 'b'\].*output="):
        daskinfer.predict(x, "two")
    np.testing.assert_array_equal(daskinfer.predict(x, "two", output="b").compute(), rows[:, 1])
    with pytest.raises(ConfigError, match='errors="column" needs a DataFrame'):
        daskinfer.predict(x, "two", output="a", errors="column")


def test_inputs_by_name_dict_and_function(client, python_model, frame):
    python_model(
        "ab",
        lambda b: b["a"] * 100 + b["b"].sum(axis=1),
        inputs={"a": ("float64", (None,)), "b": ("float64", (None, 2))},
        batch_format="dict",
    )
    ddf = dd.from_pandas(frame, npartitions=3)
    want = frame["f0"] * 100 + frame["f1"] + frame["f2"]
    by_dict = daskinfer.predict(ddf, "ab", inputs={"a": "f0", "b": ["f1", "f2"]}).compute()
    np.testing.assert_allclose(by_dict["output"].to_numpy(), want.to_numpy())
    by_fn = daskinfer.predict(
        ddf, "ab", inputs=lambda df: {"a": df["f0"].to_numpy(), "b": df[["f1", "f2"]].to_numpy()}
    ).compute()
    np.testing.assert_allclose(by_fn["output"].to_numpy(), want.to_numpy())
    named = ddf.rename(columns={"f0": "a"})[["a", "f1"]]
    with pytest.raises(ScoringError, match=r"has 2 inputs .* not all columns.*inputs="):
        daskinfer.predict(named, "ab")


def test_columns_pick_the_features_and_cast_to_the_model_dtype(client, mlp_deployed, mlp_path, frame, rows):
    shuffled = frame[["id", *FEATURES[::-1]]].assign(noise=1.0)
    got = daskinfer.predict(dd.from_pandas(shuffled, npartitions=2), "mlp", columns=FEATURES, keep="id")
    np.testing.assert_allclose(got.compute().iloc[:, 1:].to_numpy(), _reference(mlp_path, rows), atol=1e-6)
    with pytest.raises(ConfigError, match=r"column\(s\) \['missing'\] are not in the data"):
        daskinfer.predict(dd.from_pandas(frame, npartitions=2), "mlp", columns=["missing", *FEATURES[1:]])


def _fails_on_negative_first_feature(x):
    bad = np.flatnonzero(x[:, 0] < -2.5)
    if len(bad):
        raise ValueError(f"first feature below -2.5 in {len(bad)} row(s)")
    return {"label": (x[:, 0] > 0).astype(np.int64), "score": x[:, 0] * 2}


def test_errors_raise_names_partition_row_and_index(client, python_model, frame):
    python_model("picky", _fails_on_negative_first_feature)
    ddf = dd.from_pandas(frame, npartitions=4)
    bad_labels = set(frame.index[frame["f0"].to_numpy() < -2.5])
    per_part = len(frame) // 4
    with pytest.raises(ScoringError) as info:
        daskinfer.predict(ddf, "picky", columns=FEATURES).compute()
    err = info.value  # partitions run in parallel: any bad row may be the one reported
    assert err.index in bad_labels
    pos = frame.index.get_loc(err.index)
    assert (err.partition, err.row) == (pos // per_part, pos % per_part)
    assert f"row {err.row} (index {err.index!r}) of partition {err.partition}" in str(err)
    assert "ValueError: first feature below -2.5 in 1 row(s)" in str(err)


def test_errors_column_marks_exactly_the_bad_rows(client, python_model, frame):
    python_model("picky", _fails_on_negative_first_feature)
    ddf = dd.from_pandas(frame, npartitions=4)
    got = daskinfer.predict(ddf, "picky", columns=FEATURES, errors="column", keep=["id"], max_batch_size=512).compute()
    bad = frame["f0"].to_numpy() < -2.5
    assert 0 < bad.sum() < 50
    assert list(got.columns) == ["id", "label", "score", "error"]
    np.testing.assert_array_equal(got["error"].notna().to_numpy(), bad)
    assert (got["error"][bad] == "ValueError: first feature below -2.5 in 1 row(s)").all()
    assert str(got["label"].dtype) == "Int64" and got["label"][bad].isna().all()
    good = ~bad
    np.testing.assert_array_equal(got["label"][good].to_numpy(dtype=np.int64), (frame["f0"][good] > 0).to_numpy())
    np.testing.assert_allclose(got["score"][good].to_numpy(), frame["f0"][good].to_numpy() * 2)
    assert got["score"][bad].isna().all()


def test_a_broken_model_fails_before_any_work_whatever_errors_says(client, python_model, frame):
    python_model("short", lambda x: x[:1, 0])
    with pytest.raises(ScoringError, match="returned 1 results for a batch of 2 rows"):
        daskinfer.predict(dd.from_pandas(frame, npartitions=2), "short", errors="column")


def test_unknown_model_and_wrong_collection(client, mlp_deployed, frame):
    with pytest.raises(ModelNotFoundError, match="'nope' is not deployed.*'mlp'"):
        daskinfer.predict(dd.from_pandas(frame, npartitions=2), "nope")
    with pytest.raises(TypeError, match="dask DataFrame, a dask Array or a parquet path, got DataFrame"):
        daskinfer.predict(frame, "mlp")
    with pytest.raises(ConfigError, match=r"keep= names column\(s\) \['nope'\]"):
        daskinfer.predict(dd.from_pandas(frame, npartitions=2), "mlp", keep=["nope"])


def test_parquet_in_and_out(client, mlp_deployed, mlp_path, frame, rows, tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    dd.from_pandas(frame, npartitions=3).to_parquet(src)
    assert daskinfer.predict(str(src), "mlp", keep=["id"], out=dst) is None
    got = pd.read_parquet(dst).sort_values("id")
    np.testing.assert_array_equal(got["id"].to_numpy(), frame["id"].to_numpy())
    np.testing.assert_allclose(
        got[["probabilities_0", "probabilities_1"]].to_numpy(), _reference(mlp_path, rows), atol=1e-6
    )


def test_cli_predict_writes_parquet_with_a_terminal_bar(client, mlp_path, frame, rows, tmp_path, capsys):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    dd.from_pandas(frame, npartitions=3).to_parquet(src)
    status = cli_main(
        [
            "predict",
            str(src),
            "--model",
            f"clf={mlp_path}",
            "--out",
            str(dst),
            "--keep",
            "id",
            "--scheduler",
            client.scheduler.address,
            "--errors",
            "column",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "100% Completed" in printed  # distributed's text progress bar
    assert f"scored {len(frame)} rows" in printed and "model 'clf'" in printed
    got = pd.read_parquet(dst).sort_values("id")
    assert got["error"].isna().all()
    np.testing.assert_allclose(
        got[["probabilities_0", "probabilities_1"]].to_numpy(), _reference(mlp_path, rows), atol=1e-6
    )
    assert "clf" not in daskinfer.deployed_models(client)  # undeployed from a cluster it joined


def test_cli_predict_ships_a_python_function_from_the_current_directory(client, frame, tmp_path, capsys, monkeypatch):
    # the module exists only here: the workers get the function by value, not by import
    (tmp_path / "my_scoring.py").write_text("def total(x):\n    return x.sum(axis=1)\n")
    monkeypatch.chdir(tmp_path)
    dd.from_pandas(frame, npartitions=2).to_parquet(tmp_path / "in.parquet")
    status = cli_main(
        [
            "predict",
            "in.parquet",
            "--model",
            "my_scoring:total",
            "--out",
            "out.parquet",
            "--columns",
            ",".join(FEATURES),
            "--scheduler",
            client.scheduler.address,
            "--no-progress",
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert "model 'total'" in capsys.readouterr().out
    got = pd.read_parquet(tmp_path / "out.parquet")
    np.testing.assert_allclose(np.sort(got["output"].to_numpy()), np.sort(frame[FEATURES].sum(axis=1).to_numpy()))


def test_cli_predict_says_what_is_wrong(client, tmp_path, capsys):
    assert (
        cli_main(
            [
                "predict",
                "x.parquet",
                "--model",
                "nomodule:fn",
                "--out",
                str(tmp_path / "o"),
                "--scheduler",
                client.scheduler.address,
            ]
        )
        == 2
    )
    assert "daskinfer predict: No module named 'nomodule'" in capsys.readouterr().err
