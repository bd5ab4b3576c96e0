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


def _array(value: Any, name: str, model: str) -> np.ndarray:
    if type(value) is np.ndarray:
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists, mixed types
        raise InputValidationError(
            f"model {model!r}: input {name!r} is not a regular array ({e})", model=model, input_name=name
        ) from None


def as_block(batch: Any, input_names: list[str] | None, model: str) -> dict[str, np.ndarray]:
    """Turn what a user passes (an array, a list, or a mapping of them) into a block dict.

    A model with exactly one input takes it under any name: a bare array, or a mapping
    with one differently named entry, goes to that input.
    """
    single = input_names[0] if input_names is not None and len(input_names) == 1 else None
    if isinstance(batch, Mapping):
        if single is not None and len(batch) == 1:
            ((key, value),) = batch.items()
            return {single: _array(value, str(key), model)}
        return {str(k): _array(v, str(k), model) for k, v in batch.items()}
    if input_names is not None and single is None:
        raise InputValidationError(
            f"model {model!r} has {len(input_names)} inputs {input_names}; pass a dict of arrays keyed by input name",
            model=model,
        )
    name = single or "input"
    return {name: _array(batch, name, model)}


def cast_block(block: dict[str, np.ndarray], specs: list[TensorSpec] | None) -> dict[str, np.ndarray]:
    """Cast inputs to their declared dtypes where no value changes kind (float64 -> float32,
    int -> float; not float -> int, nor text -> numbers); others are left for validation to refuse."""
    if not specs:
        return block
    want = {s.name: s.dtype for s in specs if s.dtype is not None}
    out = block
    for name, arr in block.items():
        dtype = want.get(name)
        if dtype is not None and arr.dtype != dtype and np.can_cast(arr.dtype, dtype, casting="same_kind"):
            if out is block:
                out = dict(block)
            out[name] = arr.astype(dtype)
    return out


def validate_block(
    block: Mapping[str, np.ndarray], specs: list[TensorSpec] | None, model: str, *, casting: bool = False
) -> int:
    """Check a block against input specs; return its number of rows.

    Raises :class:`InputValidationError` naming the model, the input and what was expected
    (``casting``: whether the model casts inputs, for the hint on a dtype mismatch).
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
                f"model {model!r}: inputs have different numbers of rows ({ {k: len(v) for k, v in block.items()} })",
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
            hint = ""
            if not casting and np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                hint = f"; send {spec.dtype}, or give the model cast_inputs=True to cast such inputs"
            raise InputValidationError(
                f"model {model!r}: input {name!r} expects dtype {spec.dtype}, got {arr.dtype}{hint}",
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


def as_output_block(
    result: Any, output_names: list[str], rows: int, model: str, *, select: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Turn what a model returned into a block of outputs and check it has ``rows`` rows.

    ``select``: the outputs to keep, in this order, when the model returns a mapping
    (a name it did not return is a :class:`ModelError`).
    """
    if isinstance(result, Mapping):
        if select is not None:
            missing = [n for n in select if n not in result]
            if missing:
                raise ModelError(
                    f"model {model!r} returned outputs {sorted(map(str, result))}, without {missing[0]!r} "
                    f"asked for by outputs={select}",
                    model=model,
                )
            result = {n: result[n] for n in select}
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


def zero_block(specs: list[TensorSpec] | None, rows: int) -> dict[str, np.ndarray] | None:
    """A batch of ``rows`` zero rows for these inputs, or None unless each has a dtype and full shape."""
    if not specs:
        return None
    block = {}
    for spec in specs:
        if spec.shape is None or spec.dtype is None or any(d is None for d in spec.shape[1:]):
            return None
        block[spec.name] = np.zeros((rows, *(int(d) for d in spec.shape[1:] if d is not None)), dtype=spec.dtype)
    return block
