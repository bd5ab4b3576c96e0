"""Convert a trained model to ONNX and check it in one call: :func:`to_onnx`.

Converters (``pip install daskinfer[convert]``): skl2onnx for scikit-learn estimators
and pipelines (:mod:`daskinfer.convert.skl`), onnxmltools for XGBoost and LightGBM's
scikit-learn estimators (:mod:`daskinfer.convert.xgb`, :mod:`daskinfer.convert.lgbm`).
Each is imported only when a model of its framework is converted.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.convert.check import Comparison, compare_labels, compare_values, rows_per_second
from daskinfer.exceptions import ConversionError

CONVERTERS = {"sklearn": ("scikit-learn", "skl"), "xgboost": ("XGBoost", "xgb"), "lightgbm": ("LightGBM", "lgbm")}
"""Top-level module of an estimator's class -> (framework, converter module in this package)."""


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`to_onnx` converted, how close the outputs are, and which ran faster here.

    ``framework_rows_s`` and ``onnx_rows_s`` are the best rows/s over repeated calls on
    ``timing_rows`` rows; the ONNX side runs as a deployed ``OnnxModel`` does (config
    ``daskinfer.onnx.*``, one thread by default), the framework with its own defaults.
    """

    framework: str
    estimator: str
    target_opset: int
    inputs: list[str]
    outputs: list[str]
    comparisons: list[Comparison]
    rows_compared: int
    timing_rows: int
    framework_rows_s: float
    onnx_rows_s: float
    tolerance: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """ONNX rows/s over the framework's rows/s (above 1: ONNX is faster)."""
        return self.onnx_rows_s / self.framework_rows_s

    @property
    def faster(self) -> str:
        """``"onnx"`` or the framework's name, whichever scored more rows per second here."""
        return "onnx" if self.speedup >= 1 else self.framework

    def __str__(self) -> str:
        compared = ", ".join(str(c) for c in self.comparisons)
        ratio = self.speedup if self.speedup >= 1 else 1 / self.speedup
        return (
            f"{self.estimator} ({self.framework}) -> ONNX opset {self.target_opset}, inputs {self.inputs}, "
            f"outputs {self.outputs}\n"
            f"outputs match on {self.rows_compared} sample rows: {compared}\n"
            f"{'ONNX' if self.faster == 'onnx' else self.framework} is {ratio:.1f}x faster here on "
            f"{self.timing_rows}-row blocks: ONNX {self.onnx_rows_s:,.0f} rows/s, "
            f"{self.framework} {self.framework_rows_s:,.0f} rows/s"
        )


def framework_of(model: Any) -> str:
    """The key of :data:`CONVERTERS` for ``model``; raises :class:`ConversionError` if none fits."""
    root = type(model).__module__.split(".")[0]
    if root not in CONVERTERS:
        raise ConversionError(
            f"cannot convert a {type(model).__module__}.{type(model).__name__}: to_onnx knows scikit-learn "
            "estimators and pipelines, XGBClassifier/XGBRegressor and LGBMClassifier/LGBMRegressor; export "
            "PyTorch models with torch.onnx.export"
        )
    return root


def _dynamic_rows(proto: Any) -> None:
    """Declare every output's first dimension as the row dimension (onnxmltools fixes LightGBM's label at 1)."""
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"


def to_onnx(
    model: Any,
    sample_rows: Any,
    *,
    input_name: str = "x",
    target_opset: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    timing_rows: int | None = None,
    path: str | os.PathLike | None = None,
) -> tuple[bytes, ConversionReport]:
    """Convert a trained model to ONNX, check its outputs and time it against the original.

    Parameters
    ----------
    model : estimator
        A fitted scikit-learn estimator or pipeline, XGBClassifier/XGBRegressor, or
        LGBMClassifier/LGBMRegressor.
    sample_rows : array-like, shape (n, n_features)
        Rows to compare outputs on (cast to float32, the ONNX input type).
    input_name : str
        Name of the ONNX input (a DataFrame scored with :func:`daskinfer.predict` feeds
        all its feature columns to it).
    target_opset : int, optional
        ONNX opset; config ``daskinfer.convert.target-opset``.
    rtol, atol : float, optional
        Tolerance of the comparison; config ``daskinfer.convert.rtol`` / ``atol``.
    timing_rows : int, optional
        Rows per call when timing both; config ``daskinfer.convert.timing-rows``.
    path : str, optional
        Also write the ONNX model to this file.

    Returns
    -------
    (bytes, ConversionReport)
        The ONNX model (``OnnxModel(name, onnx_bytes)``), and what was compared and timed.

    Raises
    ------
    ConversionError
        The converter failed, or the ONNX outputs differ from ``predict_proba`` /
        ``predict`` beyond the tolerance (the message names the output, the largest
        difference and where it is).

    Examples
    --------
    >>> onnx_bytes, report = to_onnx(pipeline, X[:200])  # doctest: +SKIP
    >>> print(report)                                     # doctest: +SKIP
    >>> deploy(client, OnnxModel("clf", onnx_bytes))      # doctest: +SKIP
    """
    from daskinfer.models.onnx import OnnxModel

    root = framework_of(model)
    framework, module = CONVERTERS[root]
    opset = int(settings.get("convert.target-opset", target_opset))
    rtol = float(settings.get("convert.rtol", rtol))
    atol = float(settings.get("convert.atol", atol))
    n_timing = int(settings.get("convert.timing-rows", timing_rows))
    x = np.ascontiguousarray(np.asarray(sample_rows, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ConversionError(f"sample_rows must be a non-empty 2-D array of rows, got shape {list(x.shape)}")
    converter = importlib.import_module(f"daskinfer.convert.{module}")
    try:
        proto = converter.convert(model, x.shape[1], input_name, opset)
    except Exception as e:
        raise ConversionError(
            f"converting {type(model).__name__} ({framework}) to ONNX failed: {type(e).__name__}: {e}"
        ) from e
    _dynamic_rows(proto)
    onnx_bytes = proto.SerializeToString()
    loaded = OnnxModel("to-onnx-check", onnx_bytes, warmup=False).load()
    try:
        got = loaded.predict({input_name: x})
        comparisons = _compare(model, x, got, rtol, atol)
        block = np.ascontiguousarray(np.resize(x, (n_timing, x.shape[1])))
        method = model.predict_proba if hasattr(model, "predict_proba") else model.predict
        framework_rows_s = rows_per_second(lambda: method(block), n_timing)
        onnx_rows_s = rows_per_second(lambda: loaded.predict({input_name: block}), n_timing)
        report = ConversionReport(
            framework=framework,
            estimator=type(model).__name__,
            target_opset=opset,
            inputs=[s.describe() for s in loaded.inputs or []],
            outputs=list(got),
            comparisons=comparisons,
            rows_compared=len(x),
            timing_rows=n_timing,
            framework_rows_s=framework_rows_s,
            onnx_rows_s=onnx_rows_s,
            tolerance={"rtol": rtol, "atol": atol},
        )
    finally:
        loaded.close()
    if path is not None:
        with open(path, "wb") as f:
            f.write(onnx_bytes)
    return onnx_bytes, report


def _compare(model: Any, x: np.ndarray, got: dict[str, np.ndarray], rtol: float, atol: float) -> list[Comparison]:
    """Classifiers: probabilities vs ``predict_proba`` and labels vs ``predict``; others: the output vs ``predict``."""
    name = type(model).__name__
    if hasattr(model, "predict_proba"):
        probs_name = next((k for k, v in got.items() if v.dtype.kind == "f" and v.ndim == 2), None)
        label_name = next((k for k in got if k != probs_name), None)
        if probs_name is None or label_name is None:
            raise ConversionError(
                f"the ONNX model of classifier {name} gives outputs {list(got)}; expected a label and probabilities"
            )
        reference = model.predict_proba(x)
        return [
            compare_values(probs_name, f"{name}.predict_proba", got[probs_name], reference, rtol, atol),
            compare_labels(
                label_name, f"{name}.predict", got[label_name], np.asarray(model.predict(x)), reference, atol
            ),
        ]
    (out_name, value), *_ = got.items()
    reference = np.asarray(model.predict(x))
    return [compare_values(out_name, f"{name}.predict", value, reference, rtol, atol)]


__all__ = ["ConversionReport", "framework_of", "to_onnx"]
