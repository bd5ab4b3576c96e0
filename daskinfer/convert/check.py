"""Compare a converted model's outputs with the original's, and time both (numpy only).

The ONNX side runs through :meth:`daskinfer.models.loaded.LoadedModel.predict`, the
same call a deployed :class:`~daskinfer.OnnxModel` makes on a worker (same session
options, same input checks), so the timing is what a worker would see per block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer.exceptions import ConversionError


@dataclass(frozen=True)
class Comparison:
    """One ONNX output against one framework method."""

    output: str
    method: str
    max_difference: float
    mismatched_labels: int | None = None  # labels only: rows that differ (ties of the top two probabilities)

    def __str__(self) -> str:
        if self.mismatched_labels is not None:
            return f"{self.output} vs {self.method} ({self.mismatched_labels} differ, on ties)"
        return f"{self.output} vs {self.method} (largest difference {self.max_difference:.2g})"


def _worst(onnx_out: np.ndarray, reference: np.ndarray) -> tuple[float, tuple[int, ...]]:
    diff = np.abs(onnx_out.astype(np.float64) - reference.astype(np.float64))
    at = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    return float(diff.max()) if diff.size else 0.0, tuple(int(i) for i in at)


def compare_values(
    output: str, method: str, onnx_out: np.ndarray, reference: np.ndarray, rtol: float, atol: float
) -> Comparison:
    """Check ``onnx_out`` against ``reference`` within ``atol + rtol * |reference|``."""
    onnx_out = onnx_out.reshape(reference.shape) if onnx_out.size == reference.size else onnx_out
    if onnx_out.shape != reference.shape:
        raise ConversionError(
            f"ONNX output {output!r} has shape {list(onnx_out.shape)}, {method} gives {list(reference.shape)}",
            output=output,
        )
    worst, at = _worst(onnx_out, reference)
    if not np.allclose(onnx_out, reference, rtol=rtol, atol=atol):
        raise ConversionError(
            f"ONNX output {output!r} differs from {method} on the sample rows: largest difference {worst:.3g} at "
            f"{list(at)} (ONNX {onnx_out[at]!r}, {method} {reference[at]!r}); tolerance rtol={rtol:g}, atol={atol:g}",
            output=output,
            max_difference=worst,
        )
    return Comparison(output, method, worst)


def compare_labels(
    output: str, method: str, labels: np.ndarray, reference: np.ndarray, probabilities: np.ndarray, atol: float
) -> Comparison:
    """Labels must agree, except on rows whose two highest probabilities tie within ``atol``."""
    labels = labels.reshape(reference.shape)
    differ = labels.astype(str) != reference.astype(str)
    if probabilities.ndim == 2 and probabilities.shape[1] > 1:
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        differ &= (top2[:, 1] - top2[:, 0]) > 2 * atol
    if differ.any():
        row = int(np.flatnonzero(differ)[0])
        raise ConversionError(
            f"ONNX output {output!r} differs from {method} on {int(differ.sum())} sample row(s) that are no tie; "
            f"first at row {row}: ONNX {labels[row]!r}, {method} {reference[row]!r}",
            output=output,
        )
    return Comparison(output, method, 0.0, int((labels.astype(str) != reference.astype(str)).sum()))


def rows_per_second(fn: Callable[[], Any], rows: int, min_time: float = 0.2, min_calls: int = 3) -> float:
    """Best observed rows/s of ``fn`` over at least ``min_calls`` calls and ``min_time`` seconds."""
    best = float("inf")
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return rows / max(best, 1e-9)
