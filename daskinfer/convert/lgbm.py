"""LightGBM's scikit-learn estimators (LGBMClassifier, LGBMRegressor) to ONNX with onnxmltools
(``pip install daskinfer[convert]``)."""

from __future__ import annotations

from typing import Any

import onnxmltools
from onnxmltools.convert.common.data_types import FloatTensorType


def convert(model: Any, n_features: int, input_name: str, target_opset: int) -> Any:
    """The ONNX ``ModelProto`` of ``model``, without a ZipMap on the probabilities."""
    return onnxmltools.convert_lightgbm(
        model,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        target_opset=target_opset,
        zipmap=False,
    )
