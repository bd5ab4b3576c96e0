"""The batch contract every model kind shares: N rows in, N results out.

Inputs are checked against the model's :class:`~daskinfer.tensors.TensorSpec` list
before the model runs; outputs are checked to have N rows.  Errors name the model,
the input and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from daskinfer.exceptions import InputValidationError, ModelError, OutputCountError
from daskinfer.tensors import TensorSpec


def as_block(batch: Any, input_names: list[str] | None, model: str) -> dict[str, np.ndarray]:
    """Turn what a user passes (an array, or a mapping of arrays) into a block dict."""
    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    if input_names is not None and len(input_names) != 1:
        raise InputValidationError(
            f"model {model!r} has {len(input_names)} inputs {input_names}; "
            "pass a dict of arrays keyed by input name",
            model=model,
        )
    name = input_names[0] if input_names else "input"
    return {name: np.asarray(batch)}


def validate_block(block: Mapping[str, np.ndarray], specs: list[TensorSpec] | None, model: str) -> int:
    """Check a block against input specs; return its number of rows.

    Raises :class:`InputValidationError` naming the model, the input and what was expected.
    """
    if not block:
        raise InputValidationError(f"model {model!r} got an empty request (no inputs)", model=model)
    rows = None
    for name, arr in block.items():
        if np.ndim(arr) == 0:
            raise InputValidationError(
                f"model {model!r}: input {name!r} is a scalar; expected an array with a row dimension",
                model=model,
                input_name=name,
            )
        if rows is None:
            rows = len(arr)
        elif len(arr) != rows:
            raise InputValidationError(
                f"model {model!r}: inputs have different numbers of rows "
                f"({ {k: len(v) for k, v in block.items()} })",
                model=model,
                input_name=name,
            )
    assert rows is not None
    if rows == 0:
        first = next(iter(block))
        raise InputValidationError(
            f"model {model!r} got an empty batch: input {first!r} has 0 rows; expected at least 1",
            model=model,
            input_name=first,
        )
    if specs is None:
        return rows
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in block]
    if missing:
        raise InputValidationError(
            f"model {model!r}: missing input {missing[0]!r}; expected inputs "
            f"{[s.describe() for s in specs]}, got {sorted(block)}",
            model=model,
            input_name=missing[0],
        )
    extra = [n for n in block if n not in expected]
    if extra:
        raise InputValidationError(
            f"model {model!r}: unexpected input {extra[0]!r}; expected inputs {sorted(expected)}",
            model=model,
            input_name=extra[0],
        )
    for name, arr in block.items():
        spec = expected[name]
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise InputValidationError(
                f"model {model!r}: input {name!r} expects dtype {spec.dtype}, got {arr.dtype}",
                model=model,
                input_name=name,
            )
        if spec.shape is not None:
            want = spec.shape
            if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want[1:], arr.shape[1:])):
                shown = "[" + ", ".join("N" if d is None else str(d) for d in want) + "]"
                raise InputValidationError(
                    f"model {model!r}: input {name!r} expects shape {shown}, got {list(arr.shape)}",
                    model=model,
                    input_name=name,
                )
    return rows


def as_output_block(result: Any, output_names: list[str], rows: int, model: str) -> dict[str, np.ndarray]:
    """Turn what a model returned into a block of outputs and check it has ``rows`` rows."""
    if isinstance(result, Mapping):
        out = {str(k): np.asarray(v) for k, v in result.items()}
    elif isinstance(result, (list, tuple)) and len(output_names) > 1 and len(result) == len(output_names):
        out = {n: np.asarray(v) for n, v in zip(output_names, result)}
    else:
        out = {output_names[0] if output_names else "output": np.asarray(result)}
    if not out:
        raise ModelError(f"model {model!r} returned no outputs for a batch of {rows} rows", model=model)
    for name, arr in out.items():
        n_out = 1 if arr.ndim == 0 else len(arr)
        if n_out != rows:
            raise OutputCountError(model, rows, n_out, output=name if len(out) > 1 else None)
        if arr.dtype == object:
            raise ModelError(
                f"model {model!r}: output {name!r} has dtype object; return numeric, bool or string arrays",
                model=model,
            )
    return out


def check_finite(block: Mapping[str, np.ndarray], model: str) -> None:
    """Raise :class:`InputValidationError` if a float input holds NaN or infinity."""
    for name, arr in block.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(axis=1).sum())
            raise InputValidationError(
                f"model {model!r}: input {name!r} holds NaN or infinite values in {bad} row(s); "
                "this model does not accept them (allow_nan=False)",
                model=model,
                input_name=name,
            )


