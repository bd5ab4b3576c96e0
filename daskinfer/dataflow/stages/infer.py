"""The :class:`Infer` stage: run a model on the columns it takes as inputs.

Before the model call it answers, with an error each, the requests whose deadline passed and
(for a model that does not allow them) those whose inputs hold NaN or infinite values; a batch
larger than the stage's limit (its own ``max_batch_size``, else its model's, else the context's)
is cut into calls of that size; when a call fails on a batch of several requests, it is bisected,
within a bound on extra calls, to find the requests at fault.  The model's outputs join the
columns and become the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.dataflow.stages.base import Live, Stage, StageContext, check_wire_dtype
from daskinfer.exceptions import (
    ConfigError,
    DeadlineExceededError,
    InputValidationError,
    ModelError,
    ModelNotAllowedError,
    RemoteModelError,
    RequestError,
)
from daskinfer.tracing import model_span

if TYPE_CHECKING:
    from daskinfer.models.spec import Model


def _may_be_one_request(exc: BaseException) -> bool:
    """Could one request of a batch have caused ``exc``? Not a service that is down or out of time."""
    if isinstance(exc, RemoteModelError) and exc.retryable:
        return False
    return not isinstance(exc, (TimeoutError, asyncio.TimeoutError, DeadlineExceededError))


class Infer(Stage):
    """Run a model on the batch; its outputs join the columns and become the answer.

    Parameters
    ----------
    model : str or Model, optional
        A deployed model's name, or a :class:`~daskinfer.models.spec.Model` (deployed with the
        pipeline, or loaded in this process when the pipeline runs in-process).  None: the
        model a request names, else the pipeline's ``model``.
    inputs : dict, optional
        Model input name -> column name.  Default: the columns named like the model's inputs;
        a model with one input takes the only column when names differ.
    outputs : list of str, optional
        Model outputs to keep (default: all).
    strict : bool
        Give the model all the columns (it names a missing or unexpected input), instead of
        the columns named like its inputs; the one-line ``Pipeline(model=...)`` is strict.
    max_batch_size : int, optional
        Most rows in one call of the model: a larger batch is cut into calls of this size.
        Default: the model spec's ``max_batch_size``, else the pipeline's.  A pipeline that sets
        no ``max_batch_size`` of its own forms batches up to the largest of its stages' limits.
    """

    kind = "infer"

    def __init__(
        self,
        model: str | Model | None = None,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: Sequence[str] | str | None = None,
        name: str | None = None,
        strict: bool = False,
        max_batch_size: int | None = None,
    ):
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ConfigError(f"infer stage: max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.model = model
        self.strict = strict
        self.max_batch_size = max_batch_size
        self.inputs = dict(inputs) if inputs else None
        self.outputs = [outputs] if isinstance(outputs, str) else (list(outputs) if outputs else None)
        super().__init__(name or self.model_name)

    @property
    def model_name(self) -> str | None:
        return self.model if (self.model is None or isinstance(self.model, str)) else self.model.name

    def models(self) -> list[Any]:
        return [] if self.model is None else [self.model]

    def batch_limit(self) -> int | None:
        """The most rows per call this stage asks for, as far as the client knows it: its own
        ``max_batch_size``, else that of its model spec (None: neither, or a model named by string)."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return None if self.model is None or isinstance(self.model, str) else self.model.max_batch_size

    def call_rows(self, dep: Any, ctx: StageContext) -> int:
        """Most rows in one call of ``dep`` (a deployment): the stage's limit, else its model's, else
        the context's."""
        return self.max_batch_size or getattr(dep.model, "call_rows", None) or ctx.max_batch_size

    def _feed(self, dep: Any, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.inputs:
            missing = [c for c in self.inputs.values() if c not in columns]
            if missing:
                raise InputValidationError(
                    f"{self.label()}: column {missing[0]!r} (mapped to a model input) is missing; "
                    f"columns: {sorted(columns)}",
                    model=dep.name,
                )
            return {m: columns[c] for m, c in self.inputs.items()}
        names = [s.name for s in dep.inputs] if dep.inputs else None
        if names is None:
            return columns
        if len(names) == 1 and len(columns) == 1:  # one input: whatever the column's name
            return {names[0]: next(iter(columns.values()))}
        if not self.strict and all(n in columns for n in names):
            return {n: columns[n] for n in names}
        return columns  # the model's check names what is missing or unexpected

    def _deployment(self, live: Live, ctx: StageContext) -> Any:
        name = self.model_name
        if name is None:
            name = live.batch.model or ctx.default_model
            if name is None:
                raise RequestError("the request names no model and the pipeline has no default model")
            if live.batch.model is not None and ctx.allowed_models is not None and name not in ctx.allowed_models:
                raise ModelNotAllowedError(
                    f"model {name!r} is not served by this pipeline; it serves {sorted(ctx.allowed_models)}", model=name
                )
        if self.model is not None and not isinstance(self.model, str) and ctx.install_models:
            return ctx.registry.get_or_install(self.model)
        return ctx.registry.get(name)

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        out = []
        for live in lives:
            out += await self._run(live, ctx)
        return out

    async def _run(self, live: Live, ctx: StageContext) -> list[Live]:
        try:
            dep = self._deployment(live, ctx)
        except Exception as e:
            ctx.fail(live, None, e)
            return []
        alive = self._drop_expired(live, ctx)
        if alive is None:
            return []
        live = alive
        try:
            feed = self._feed(dep, live.batch.columns)
        except Exception as e:
            ctx.fail(live, None, e)
            return []
        if not dep.first.allow_nan:
            live, feed = self._drop_non_finite(live, feed, dep, ctx)
            if live is None:
                return []
        budget = [ctx.max_bisect_calls]
        return await self._call(dep, live, feed, ctx, budget)

    def _drop_expired(self, live: Live, ctx: StageContext) -> Live | None:
        dl = live.batch.deadlines
        now = time.time()
        late = dl < now  # NaN compares False
        if not late.any():
            return live
        idx = np.flatnonzero(late)
        for i in idx.tolist():  # one error per late request: their messages differ
            rid = live.batch.ids[i]
            ctx.fail(
                live,
                np.array([i]),
                DeadlineExceededError(
                    f"request {rid}: deadline passed {now - dl[i]:.3f}s before it ran", request_id=rid
                ),
            )
        keep = np.flatnonzero(~late)
        return live.replace(live.batch.take(keep)) if len(keep) else None

    def _drop_non_finite(self, live: Live, feed: dict[str, np.ndarray], dep: Any, ctx: StageContext):
        batch = live.batch
        bad_rows = np.zeros(batch.n_rows, dtype=bool)
        for arr in feed.values():
            if arr.dtype.kind in "fc" and arr.ndim and len(arr) == batch.n_rows:
                bad_rows |= ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
        if not bad_rows.any():
            return live, feed
        bad = np.zeros(len(batch), dtype=bool)
        np.logical_or.at(bad, batch.request_of_rows(), bad_rows)
        ctx.fail(
            live,
            np.flatnonzero(bad),
            InputValidationError(
                f"model {dep.name!r}: inputs hold NaN or infinite values; this model does not accept them "
                "(allow_nan=False)",
                model=dep.name,
            ),
        )
        keep = np.flatnonzero(~bad)
        if not len(keep):
            return None, feed
        rows = batch.row_index(keep)
        return live.replace(batch.take(keep)), {k: v[rows] for k, v in feed.items()}

    @staticmethod
    async def _predict(
        dep: Any, feed: dict[str, np.ndarray], rows: int, limit: int, deadline: float | None
    ) -> dict[str, np.ndarray]:
        """The model's outputs for ``feed``, in calls of at most ``limit`` rows."""
        if rows <= limit:
            return await dep.apredict(feed, deadline=deadline)
        chunks = []
        for start in range(0, rows, limit):
            chunk = {k: v[start : start + limit] for k, v in feed.items()}
            chunks.append(await dep.apredict(chunk, deadline=deadline))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    async def _call(
        self, dep: Any, live: Live, feed: dict[str, np.ndarray], ctx: StageContext, budget: list[int]
    ) -> list[Live]:
        batch = live.batch
        rows = batch.n_rows
        limit = self.call_rows(dep, ctx)
        finite = batch.deadlines[~np.isnan(batch.deadlines)]
        t0 = time.time()
        deadline = max(float(finite.min()) - t0, 0.0) if len(finite) else None
        try:
            if ctx.trace is not None:
                with model_span(dep.name, dep.version, rows):
                    outs = await self._predict(dep, feed, rows, limit, deadline)
            else:
                outs = await self._predict(dep, feed, rows, limit, deadline)
        except Exception as e:
            ctx.model_calls += 1
            if len(batch) > 1 and _may_be_one_request(e) and budget[0] >= 2:
                # isolate the requests at fault: bisect, within a bound on extra calls
                budget[0] -= 2
                half = len(batch) // 2
                first, second = np.arange(half), np.arange(half, len(batch))
                out = []
                for part in (first, second):
                    sub = live.replace(batch.take(part))
                    r = batch.row_index(part)
                    out += await self._call(dep, sub, {k: v[r] for k, v in feed.items()}, ctx, budget)
                return out
            ctx.fail(live.replace(batch, model=dep.name, version=dep.version), None, e)
            return []
        t1 = time.time()
        ctx.model_seconds += t1 - t0
        ctx.model_calls += 1
        if self.outputs:
            missing = [k for k in self.outputs if k not in outs]
            if missing:
                ctx.fail(
                    live,
                    None,
                    InputValidationError(
                        f"{self.label()}: model {dep.name!r} has no output {missing[0]!r}; outputs: {sorted(outs)}",
                        model=dep.name,
                    ),
                )
                return []
            outs = {k: outs[k] for k in self.outputs}
        for k, v in outs.items():
            try:
                check_wire_dtype(np.asarray(v), f"model {dep.name!r} output {k!r}")
            except TypeError as e:
                ctx.fail(live, None, ModelError(str(e), model=dep.name, version=dep.version))
                return []
        columns = dict(batch.columns)
        columns.update(outs)
        timings = {"queue": live.timings.get("queue", 0.0), "infer": t1 - t0, "batch": rows}
        return [Live(batch.with_columns(columns), list(outs), dep.name, dep.version, timings)]
