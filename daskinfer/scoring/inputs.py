"""How rows of a pandas DataFrame (or a numpy block) become a model's input block.

Pure code (pandas and numpy only): it runs on the worker, once per partition, and on
the client's sample rows when :func:`daskinfer.predict` checks the mapping.

The rules, in order:

- ``inputs`` is a function: it gets the rows (a ``pandas.DataFrame``, or an ndarray
  for a dask Array) and returns an array (the model's single input) or a dict of arrays.
- ``inputs`` is a dict ``{input name: column or list of columns}``: a column gives a
  1-D array, a list of columns a 2-D array in that order.
- no ``inputs``: if every input the model declares is a column, each is taken by name;
  otherwise a model with one input gets the ``columns`` (default: all but ``keep``)
  stacked as a 2-D array, the usual tabular case (16 float columns -> ``x[N, 16]``).

Numeric arrays are cast to the dtype the model declares (pandas' float64 to an ONNX
model's float32), and a 1-D array becomes ``[N, 1]`` where the model wants 2-D.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd

from daskinfer.exceptions import ConfigError, InputValidationError
from daskinfer.tensors import TensorSpec

UNNAMED = ""  # the one input of a model that has not declared its inputs

InputsArg = Union[None, Mapping[str, Union[str, Sequence[str]]], Callable[[Any], Any]]  # noqa: UP007 - evaluated at runtime on Python 3.10


def _conform(name: str, arr: np.ndarray, spec: TensorSpec | None) -> np.ndarray:
    """Cast ``arr`` to the declared dtype and rank of input ``name`` where that is lossless in kind."""
    if spec is None:
        return arr
    if spec.dtype is not None and arr.dtype != spec.dtype and arr.dtype.kind in "biuf" and spec.dtype.kind in "biuf":
        arr = arr.astype(spec.dtype)
    if spec.shape is not None and len(spec.shape) == 2 and arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    return arr


class InputMapping:
    """Columns (or an array) to model inputs; see the module docstring for the rules.

    Parameters
    ----------
    inputs : None, dict or callable
        How to build the inputs (see the module docstring).
    columns : list of str, optional
        Feature columns stacked for a one-input model when ``inputs`` is None
        (default: every column not in ``keep``).
    keep : list of str, optional
        Columns copied to the result; they are not features unless named in ``columns``.
    """

    def __init__(self, inputs: InputsArg = None, columns: Sequence[str] | None = None, keep: Sequence[str] = ()):
        if inputs is not None and not callable(inputs) and not isinstance(inputs, Mapping):
            raise ConfigError(
                f"inputs must be None, a dict {{input name: column(s)}} or a function of the rows, "
                f"got {type(inputs).__name__}"
            )
        if inputs is not None and columns is not None:
            raise ConfigError("give inputs= or columns=, not both (columns= picks the features when inputs= is None)")
        self.inputs = inputs
        self.columns = None if columns is None else list(columns)
        self.keep = list(keep)

    def needed_columns(self) -> list[str] | None:
        """The columns the mapping reads (None: it may read any)."""
        if callable(self.inputs):
            return None
        if isinstance(self.inputs, Mapping):
            cols: list[str] = []
            for v in self.inputs.values():
                cols += [v] if isinstance(v, str) else list(v)
            return cols
        return self.columns

    def __call__(self, rows: Any, specs: list[TensorSpec] | None, model: str) -> dict[str, np.ndarray] | np.ndarray:
        """The input block for ``rows`` (a DataFrame or an ndarray) of ``model`` with inputs ``specs``:
        a dict of arrays, or one array when the model has not said what its input is called
        (the model names it: a remote model learns its inputs from the service on its first call)."""
        by_name = {s.name: s for s in specs or []}
        if callable(self.inputs):
            block = self._from_function(rows, specs, model)
        elif isinstance(rows, pd.DataFrame):
            block = self._from_frame(rows, specs, model)
        else:
            if isinstance(self.inputs, Mapping):
                raise ConfigError("inputs={name: columns} needs a DataFrame; for an Array pass a function or nothing")
            block = {self._single_input(specs, model, "an array"): np.asarray(rows)}
        if list(block) == [UNNAMED]:
            return block[UNNAMED]
        return {k: _conform(k, v, by_name.get(k)) for k, v in block.items()}

    def _from_function(self, rows: Any, specs: list[TensorSpec] | None, model: str) -> dict[str, np.ndarray]:
        out = self.inputs(rows)  # type: ignore[operator,misc]
        if isinstance(out, pd.DataFrame):
            out = out.to_numpy()
        if isinstance(out, Mapping):
            return {str(k): np.asarray(v) for k, v in out.items()}
        return {self._single_input(specs, model, "an array from the inputs function"): np.asarray(out)}

    def _from_frame(self, frame: pd.DataFrame, specs: list[TensorSpec] | None, model: str) -> dict[str, np.ndarray]:
        if isinstance(self.inputs, Mapping):
            return {name: self._take(frame, cols, model, name) for name, cols in self.inputs.items()}
        if specs and self.columns is None and all(s.name in frame.columns for s in specs):
            return {s.name: self._take(frame, s.name, model, s.name) for s in specs}
        name = self._single_input(specs, model, "the DataFrame's columns")
        cols = self.columns if self.columns is not None else [c for c in frame.columns if c not in self.keep]
        spec = specs[0] if specs else None
        return {name: self._take(frame, cols, model, name, dtype=spec.dtype if spec else None)}

    @staticmethod
    def _single_input(specs: list[TensorSpec] | None, model: str, what: str) -> str:
        if specs and len(specs) > 1:
            raise InputValidationError(
                f"model {model!r} has {len(specs)} inputs {[s.describe() for s in specs]} and they are not all "
                f"columns; cannot feed it {what}: pass inputs={{input name: column(s)}} or a function",
                model=model,
            )
        return specs[0].name if specs else UNNAMED

    @staticmethod
    def _take(frame: pd.DataFrame, cols: str | Sequence[str], model: str, name: str, dtype: Any = None) -> np.ndarray:
        wanted = [cols] if isinstance(cols, str) else list(cols)
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise InputValidationError(
                f"model {model!r}: input {name!r} needs column(s) {missing} that the data does not have; "
                f"columns: {list(frame.columns)}",
                model=model,
                input_name=name,
            )
        if isinstance(cols, str):
            return frame[cols].to_numpy()
        numeric = dtype is not None and np.dtype(dtype).kind in "biuf"
        # one conversion straight to the model's dtype: no float64 copy in between
        return frame[wanted].to_numpy(dtype=dtype if numeric else None)
