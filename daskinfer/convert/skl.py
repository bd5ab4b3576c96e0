"""scikit-learn estimators and pipelines to ONNX with skl2onnx (``pip install daskinfer[convert]``)."""

from __future__ import annotations

from typing import Any

from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

ML_OPSET = 3  # ai.onnx.ml opset: TreeEnsemble*, LinearClassifier, Scaler... as onnxruntime runs them


def convert(model: Any, n_features: int, input_name: str, target_opset: int) -> Any:
    """The ONNX ``ModelProto`` of ``model``; classifiers give tensors, not a ZipMap (about 2.8x faster)."""
    return convert_sklearn(
        model,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        target_opset={"": target_opset, "ai.onnx.ml": ML_OPSET},
        options={"zipmap": False},
    )
