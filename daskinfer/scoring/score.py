"""Score the rows of one partition with a deployed model, on the worker that runs the task.

The model is the one :func:`daskinfer.deploy` loaded in the worker's registry (the
same deployment the pipelines use).  A partition's inputs are built once, then run
in blocks of at most ``max_batch_size`` rows.  A block that fails is split in halves
until the rows at fault are found (``O(k log n)`` model calls for ``k`` bad rows):
with ``errors="raise"`` the first of them fails the task with a :class:`ScoringError`
naming the partition, the row and its index label; with ``errors="column"`` each
bad row gets its message in the error column and missing values in the outputs.
Failures that are no row's fault (the model is not here, it broke the batch
contract, a remote service is down) always raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from daskinfer.exceptions import (
    ConfigError,
    ModelLoadError,
    ModelNotFoundError,
    OutputCountError,
    RemoteModelError,
    ScoringError,
)
from daskinfer.models.registry import registry_for
from daskinfer.scoring.inputs import InputMapping
from daskinfer.tensors import TensorSpec

ERRORS = ("raise", "column")


def row_may_be_at_fault(exc: BaseException) -> bool:
    """Could one row of a block have caused ``exc``?  Not a missing model, a broken
    batch contract, or a service that is down or out of time."""
    if isinstance(exc, RemoteModelError) and exc.retryable:
        return False
    return not isinstance(
        exc, (ModelNotFoundError, ModelLoadError, OutputCountError, TimeoutError, asyncio.TimeoutError, MemoryError)
    )


def output_columns(spec: TensorSpec) -> list[str]:
    """Column names of one output: ``name`` for one value per row, ``name_0..`` for a vector."""
    trailing = spec.shape[1:] if spec.shape else ()
    if not trailing:
        return [spec.name]
    if len(trailing) == 1:
        return [f"{spec.name}_{i}" for i in range(int(trailing[0] or 0))]
    raise ConfigError(
        f"output {spec.name!r} has {len(trailing) + 1} dimensions {list(spec.shape or ())}; DataFrame columns hold "
        "one value or one vector per row: score a dask Array instead, or select other outputs with output="
    )


def _nullable(arr: np.ndarray, bad: np.ndarray) -> Any:
    """``arr`` with missing values at ``bad``: NaN for floats, pandas' nullable types otherwise."""
    if arr.dtype.kind in "fc":
        out = arr.copy()
        out[bad] = np.nan
        return out
    if arr.dtype.kind in "iu":
        return pd.arrays.IntegerArray(arr, bad.copy())
    if arr.dtype.kind == "b":
        return pd.arrays.BooleanArray(arr, bad.copy())
    out = arr.astype(object)
    out[bad] = None
    return out


@dataclass(frozen=True)
class Scorer:
    """What scores one partition (small and picklable: it travels in the task graph).

    Parameters
    ----------
    model : str
        Name of a deployed model.
    mapping : InputMapping
        Rows to inputs.
    errors : {"raise", "column"}
        What a row that fails does.
    error_column : str
        Name of the column of error messages (``errors="column"``).
    max_batch_size : int
        Most rows per model call.
    output : tuple of str, optional
        Outputs to keep (default: all).
    keep : tuple of str
        Input columns copied to the result.
    output_specs : tuple of TensorSpec, optional
        dtype and shape of every kept output, set once a sample has been scored;
        every partition then has the same columns and dtypes.
    """

    model: str
    mapping: InputMapping
    errors: str = "raise"
    error_column: str = "error"
    max_batch_size: int = 4096
    output: tuple[str, ...] | None = None
    keep: tuple[str, ...] = ()
    output_specs: tuple[TensorSpec, ...] | None = None

    def __post_init__(self) -> None:
        if self.errors not in ERRORS:
            raise ConfigError(f"errors must be one of {ERRORS}, got {self.errors!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")

    # ---- on the worker -------------------------------------------------------------

    def score_frame(self, frame: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        """Score a pandas partition; the result has the same index, kept columns first."""
        partition = None if partition_info is None else partition_info.get("number")
        outputs, messages = self._score(frame, len(frame), partition, frame.index)
        return self.assemble(frame, outputs, messages)

    def score_array(self, block: np.ndarray, partition: int) -> np.ndarray:
        """Score a numpy block of a dask Array; returns the one selected output."""
        outputs, _ = self._score(block, len(block), partition, None)
        (spec,) = self.output_specs or (None,)
        return outputs[spec.name] if spec is not None else next(iter(outputs.values()))

    def probe(self, rows: Any) -> tuple[list[TensorSpec] | None, list[TensorSpec]]:
        """Score sample rows in one call; return the model's input specs and the specs of its
        kept outputs.  A failure here is the mapping's or the model's, not a row's: it says
        which columns fed which input."""
        dep = registry_for().get(self.model)
        block = None
        try:
            block = self.mapping(rows, dep.inputs, self.model)
            out = dep.predict(block)
        except Exception as e:
            fed = None if block is None else {k: list(v.shape) for k, v in _as_dict(block).items()}
            raise ScoringError(
                f"model {self.model!r} cannot score sample rows with columns {list(getattr(rows, 'columns', []))}"
                f"{'' if fed is None else f' fed to it as {fed}'}: {type(e).__name__}: {e}",
                model=self.model,
            ) from e
        outputs = self._select(out, None)
        return dep.inputs, [TensorSpec(k, v.dtype, (None, *v.shape[1:])) for k, v in outputs.items()]

    def _select(self, out: dict[str, np.ndarray], partition: int | None) -> dict[str, np.ndarray]:
        if self.output is None:
            return out
        missing = [k for k in self.output if k not in out]
        if missing:
            raise ScoringError(
                f"model {self.model!r} has no output {missing[0]!r}; its outputs: {sorted(out)}",
                model=self.model,
                partition=partition,
            )
        return {k: out[k] for k in self.output}

    def _score(
        self, rows: Any, n: int, partition: int | None, index: Any
    ) -> tuple[dict[str, np.ndarray], list[tuple[int, int, str]]]:
        dep = registry_for().get(self.model)
        specs = dep.inputs
        where = f"partition {partition}"
        if n == 0:
            return self._empty_outputs(), []
        try:
            whole = self.mapping(rows, specs, self.model)
            block_for: Callable[[int, int], Any] = lambda lo, hi: _slice(whole, lo, hi)  # noqa: E731
        except Exception:
            # the mapping failed on some row: build inputs block by block, so the bisection finds it
            block_for = lambda lo, hi: self.mapping(_rows(rows, lo, hi), specs, self.model)  # noqa: E731
        pieces: list[tuple[int, int, dict[str, np.ndarray]]] = []
        failed: list[tuple[int, int, str]] = []

        def attempt(lo: int, hi: int) -> None:
            try:
                out = dep.predict(block_for(lo, hi))
            except Exception as e:
                message = f"{type(e).__name__}: {e}"
                if not row_may_be_at_fault(e):
                    raise ScoringError(
                        f"model {self.model!r} failed on {where} ({n} rows): {message}",
                        model=self.model,
                        partition=partition,
                    ) from e
                if hi - lo > 1:
                    mid = (lo + hi) // 2
                    attempt(lo, mid)
                    attempt(mid, hi)
                    return
                if self.errors == "raise":
                    label = None if index is None else index[lo]
                    at = "" if index is None else f" (index {label!r})"
                    raise ScoringError(
                        f"model {self.model!r} failed on row {lo}{at} of {where}: {message}",
                        model=self.model,
                        partition=partition,
                        row=lo,
                        index=label,
                    ) from e
                failed.append((lo, hi, message))
                return
            pieces.append((lo, hi, self._select(out, partition)))

        for lo in range(0, n, self.max_batch_size):
            attempt(lo, min(lo + self.max_batch_size, n))
        return self._join(pieces, failed, n), failed

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        if self.output_specs is None:
            raise ScoringError(
                f"model {self.model!r}: its outputs are not known before sample rows are scored", model=self.model
            )
        return {s.name: np.empty((0, *(s.shape or ())[1:]), s.dtype) for s in self.output_specs}  # type: ignore[arg-type]

    def _join(self, pieces: list, failed: list, n: int) -> dict[str, np.ndarray]:
        if not failed and len(pieces) == 1:
            return pieces[0][2]
        if self.output_specs is not None:
            template = {s.name: (s.dtype, (s.shape or ())[1:]) for s in self.output_specs}
        else:  # scored without a probe first: the first good block tells
            template = {k: (v.dtype, v.shape[1:]) for k, v in pieces[0][2].items()}
        out = {k: np.zeros((n, *shape), dtype) for k, (dtype, shape) in template.items()}  # type: ignore[type-var,arg-type]
        for lo, hi, piece in pieces:
            for k, arr in out.items():
                arr[lo:hi] = piece[k]
        return out

    def assemble(self, frame: pd.DataFrame, outputs: dict[str, np.ndarray], failed: list) -> pd.DataFrame:
        """The result frame: kept columns, one column per output value, the error column."""
        columns: dict[str, Any] = {c: frame[c] for c in self.keep}
        bad = None
        if self.errors == "column":
            bad = np.zeros(len(frame), bool)
            messages = np.full(len(frame), None, dtype=object)
            for lo, hi, message in failed:
                bad[lo:hi] = True
                messages[lo:hi] = message
        specs = self.output_specs or [TensorSpec(k, v.dtype, (None, *v.shape[1:])) for k, v in outputs.items()]
        for spec in specs:
            arr = outputs[spec.name]
            if spec.dtype is not None and arr.dtype != spec.dtype:
                arr = arr.astype(spec.dtype)
            names = output_columns(spec)
            values = [arr] if arr.ndim == 1 else [arr[:, i] for i in range(arr.shape[1])]
            for col, v in zip(names, values):
                columns[col] = _nullable(v, bad) if bad is not None else v
        if bad is not None:
            columns[self.error_column] = pd.array(messages, dtype="string")
        return pd.DataFrame(columns, index=frame.index)

    def empty_frame(self, meta: pd.DataFrame) -> pd.DataFrame:
        """The zero-row result for ``meta`` (the collection's meta): the result's meta."""
        return self.assemble(meta.iloc[:0], self._empty_outputs(), [])

    def result_columns(self) -> list[str]:
        """Names of the result's columns, in order."""
        cols = list(self.keep)
        for spec in self.output_specs or ():
            cols += output_columns(spec)
        if self.errors == "column":
            cols.append(self.error_column)
        return cols


def _slice(block: Any, lo: int, hi: int) -> Any:
    return {k: v[lo:hi] for k, v in block.items()} if isinstance(block, dict) else block[lo:hi]


def _as_dict(block: Any) -> dict[str, np.ndarray]:
    return block if isinstance(block, dict) else {"(unnamed)": block}


def _rows(rows: Any, lo: int, hi: int) -> Any:
    return rows.iloc[lo:hi] if isinstance(rows, pd.DataFrame) else rows[lo:hi]


def check_names(scorer: Scorer) -> None:
    """Raise if two result columns would have the same name."""
    names = scorer.result_columns()
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ConfigError(
            f"result columns {dup} would appear twice (kept input columns, outputs "
            f"{[s.name for s in scorer.output_specs or ()]}"
            f", error column {scorer.error_column!r}); rename the input column or choose error_column="
        )
