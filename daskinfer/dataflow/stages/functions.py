"""Stages around one user function: :class:`MapBatches` (``fn(columns) -> columns``) and
:class:`Filter` (``fn(columns) -> bool per row or per request``).

The function is a callable, or ``"module:function"`` checked on the deploying client and
imported once where the stage runs (:class:`_UserFunctionStage`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from daskinfer.dataflow.batch import RequestBatch
from daskinfer.dataflow.stages.base import (
    Live,
    Stage,
    StageContext,
    _check_columns,
    _user_error,
    callable_name,
    check_callable,
    resolve_callable,
)
from daskinfer.exceptions import ConfigError, RequestRejected, StageError


class _UserFunctionStage(Stage):
    """A stage around one user function: a callable, or ``"module:function"`` resolved on the worker."""

    def __init__(self, fn: Callable[..., Any] | str, name: str | None):
        self.fn = fn
        super().__init__(name or (fn if isinstance(fn, str) else callable_name(fn)))
        self._resolved: Callable[..., Any] | None = None

    def check(self) -> None:
        check_callable(self.fn, self.label())

    def resolve_references(self) -> None:
        self.resolve()

    def resolve(self) -> Callable[..., Any]:
        """The function itself (imported on first use where it was given as ``"module:function"``)."""
        if self._resolved is None:
            self._resolved = resolve_callable(self.fn, self.label())
        return self._resolved


class MapBatches(_UserFunctionStage):
    """``fn(columns) -> columns`` on each batch; what it returns replaces the columns.

    Parameters
    ----------
    fn : callable or str
        Takes a dict of column name to array (rows first) and returns one, with the same
        number of rows; ``"module:function"`` is imported where the stage runs.
    batch_format : {"numpy", "pandas"}
        ``"pandas"`` passes and expects a :class:`pandas.DataFrame` (one column per 1-d array).
    """

    kind = "map_batches"

    def __init__(self, fn: Callable[..., Any] | str, *, batch_format: str = "numpy", name: str | None = None):
        if batch_format not in ("numpy", "pandas"):
            raise ConfigError(f"map_batches: batch_format must be 'numpy' or 'pandas', got {batch_format!r}")
        self.batch_format = batch_format
        super().__init__(fn, name)

    def _call(self, columns: dict[str, np.ndarray]) -> Any:
        fn = self._resolved
        if self.batch_format == "pandas":
            import pandas as pd

            out = fn(pd.DataFrame(columns))  # type: ignore[misc]
            return {k: out[k].to_numpy() for k in out.columns} if isinstance(out, pd.DataFrame) else out
        return fn(columns)  # type: ignore[misc]

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        self.resolve()
        out = []
        for live in lives:
            batch = live.batch
            rows = batch.n_rows
            try:
                res = await ctx.call_user(self._call, dict(batch.columns), rows=rows)
                cols = _check_columns(res, rows, self.label())
            except Exception as e:
                ctx.fail(live, None, _user_error(self.label(), self._resolved, e))
                continue
            out.append(live.replace(batch.with_columns(cols), result=None))
        return out


class Filter(_UserFunctionStage):
    """Keep the requests for which ``fn(columns)`` is true; the others are answered with
    :class:`~daskinfer.exceptions.RequestRejected` naming the filter.

    ``fn`` returns one bool per row (a block request is kept when all its rows are) or one
    per request.
    """

    kind = "filter"

    def __init__(self, fn: Callable[..., Any] | str, *, reason: str | None = None, name: str | None = None):
        self.reason = reason
        super().__init__(fn, name)

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        fn = self.resolve()
        out = []
        for live in lives:
            batch = live.batch
            try:
                mask = np.asarray(await ctx.call_user(fn, dict(batch.columns), rows=batch.n_rows))
                mask = self._per_request(mask, batch)
            except Exception as e:
                ctx.fail(live, None, _user_error(self.label(), fn, e))
                continue
            if mask.all():
                out.append(live)
                continue
            why = self.reason or "the request did not pass it"
            ctx.fail(
                live, np.flatnonzero(~mask), RequestRejected(f"rejected by {self.label()}: {why}", stage=self.label())
            )
            keep = np.flatnonzero(mask)
            if len(keep):
                out.append(live.replace(batch.take(keep)))
        return out

    def _per_request(self, mask: np.ndarray, batch: RequestBatch) -> np.ndarray:
        if mask.dtype != bool or mask.ndim != 1:
            raise StageError(
                f"{self.label()} must return a 1-d bool array, got {mask.dtype} of shape {list(mask.shape)}",
                stage=self.label(),
            )
        if len(mask) == len(batch) and (batch.offsets is None or len(mask) != batch.n_rows):
            return mask
        if len(mask) == batch.n_rows:
            failed = np.zeros(len(batch), dtype=bool)
            np.logical_or.at(failed, batch.request_of_rows(), ~mask)
            return ~failed
        raise StageError(
            f"{self.label()} returned {len(mask)} values for {len(batch)} requests ({batch.n_rows} rows)",
            stage=self.label(),
        )
