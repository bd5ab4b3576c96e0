"""Batch scoring of a dask DataFrame three ways, side by side, on the same trained model and data.

The model is a scikit-learn ``MLPClassifier`` (hidden layers 64, 64) trained here on 16 float
features; the data is a dask DataFrame of a few million rows of 16 float32 columns, persisted on
the workers before anything is timed.  Each way computes ``predict_proba`` for every row:

1. ``daskinfer.predict`` with the model converted by ``daskinfer.convert.to_onnx`` and deployed
   as an ``OnnxModel`` (each partition scored on its worker, in 4096-row blocks);
2. dask-ml's ``ParallelPostFit(estimator).predict_proba`` with the scikit-learn estimator;
3. the ``map_partitions`` + onnxruntime code users write by hand: an ``InferenceSession`` made
   per partition with default options, one ``run`` on the whole partition (``vs_map_partitions``),
   and the same tuned to one onnxruntime thread per worker (``vs_map_partitions_1thread``).

Outputs are compared (1 against 3 exactly as the same ONNX model, 1 against 2 within float32
tolerance).  The cluster is a ``dask scheduler`` and two one-thread ``dask worker`` processes.
Each way runs several times, interleaved, and its best time counts; the machine is shared, so
read the ratios.  The last line printed is one JSON object.

    python benchmarks/batch.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import wait

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import process_cluster  # noqa: E402

import daskinfer  # noqa: E402
from daskinfer import OnnxModel, deploy  # noqa: E402

N_FEATURES = 16
FEATURES = [f"f{i}" for i in range(N_FEATURES)]


def train(seed: int = 0):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3_000, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] - np.abs(x[:, 3]) > 0).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=20, random_state=seed).fit(x, y), x


def ort_per_partition(frame: pd.DataFrame, onnx_bytes: bytes, threads: int = 0) -> pd.DataFrame:
    """What users write by hand: a session per partition (default options: ``threads=0``), one run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    _, probs = sess.run(None, {"x": frame.to_numpy(dtype=np.float32)})
    return pd.DataFrame(probs, index=frame.index, columns=["p0", "p1"])


def timed(make, client) -> float:
    """Seconds to compute ``make()`` on the cluster into worker memory; the result is released
    afterwards, so that the next run computes it again instead of finding it there."""
    t0 = time.perf_counter()
    result = client.persist(make())
    wait(result)
    seconds = time.perf_counter() - t0
    del result
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats (well under 90 s)")
    ap.add_argument("--rows", type=int, default=None, help="rows to score (default 4M, quick 1M)")
    ap.add_argument("--partition-rows", type=int, default=250_000, help="rows per dask partition")
    args = ap.parse_args(argv)
    n_rows = args.rows or (1_000_000 if args.quick else 4_000_000)
    repeats = 2 if args.quick else 3
    t_start = time.perf_counter()

    from dask_ml.wrappers import ParallelPostFit

    estimator, sample = train()
    onnx_bytes, report = daskinfer.convert.to_onnx(estimator, sample[:1000])
    print(report)
    print(f"trained and converted in {time.perf_counter() - t_start:.0f}s")

    with process_cluster(2) as client:
        deploy(client, OnnxModel("mlp", onnx_bytes))
        x = da.random.default_rng(1).standard_normal((n_rows, N_FEATURES), chunks=(args.partition_rows, N_FEATURES))
        ddf = dd.from_dask_array(x.astype(np.float32), columns=FEATURES).persist()
        wait(ddf)
        print(
            f"{n_rows:,} rows x {N_FEATURES} float32 columns in {ddf.npartitions} partitions on 2 workers "
            f"(ready at {time.perf_counter() - t_start:.0f}s)"
        )

        meta = pd.DataFrame({"p0": np.float32(), "p1": np.float32()}, index=[])
        ways = {
            "daskinfer.predict (ONNX)": lambda: daskinfer.predict(ddf, "mlp", output="probabilities", client=client),
            "dask-ml ParallelPostFit (scikit-learn)": lambda: ParallelPostFit(estimator).predict_proba(ddf),
            "map_partitions + onnxruntime session per partition": lambda: ddf.map_partitions(
                ort_per_partition, onnx_bytes, meta=meta
            ),
            "the same with intra_op_num_threads=1 (tuned)": lambda: ddf.map_partitions(
                ort_per_partition, onnx_bytes, 1, meta=meta
            ),
        }
        best = {name: float("inf") for name in ways}
        for _ in range(repeats):
            for name, make in ways.items():
                best[name] = min(best[name], timed(make, client))
        values = {name: np.asarray(make().compute()) for name, make in ways.items()}
        ours, postfit, by_hand, tuned = values.values()
        np.testing.assert_allclose(by_hand, tuned, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours, by_hand, rtol=0, atol=1e-6)  # the same ONNX model
        np.testing.assert_allclose(ours, postfit, rtol=1e-3, atol=1e-4)  # float32 ONNX vs float64 scikit-learn
        print(
            f"outputs agree: daskinfer vs map_partitions max diff {np.abs(ours - by_hand).max():.2g}, "
            f"vs ParallelPostFit max diff {np.abs(ours - postfit).max():.2g}"
        )
        rates = {name: n_rows / s for name, s in best.items()}
        for name, rate in rates.items():
            print(f"{name}: {rate:,.0f} rows/s (best of {repeats}: {best[name]:.2f}s)")
        r_ours, r_postfit, r_hand, r_tuned = rates.values()
    print(f"total {time.perf_counter() - t_start:.0f}s")
    print(
        json.dumps(
            {
                "rows_s": round(r_ours),
                "vs_parallel_postfit": round(r_ours / r_postfit, 2),
                "vs_map_partitions": round(r_ours / r_hand, 2),
                "vs_map_partitions_1thread": round(r_ours / r_tuned, 2),
                "parallel_postfit_rows_s": round(r_postfit),
                "map_partitions_rows_s": round(r_hand),
                "rows": n_rows,
                "partitions": ddf.npartitions,
            }
        )
    )


if __name__ == "__main__":
    main()
