"""Answering batches: the step shared by partitions on workers and pipelines run in-process."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.dataflow.batch import InboxBatch, Origin, RequestBatch, ResultBatch
from daskinfer.dataflow.stages import Live, Stage, StageContext, finish, run_stages
from daskinfer.exceptions import ResultError

if TYPE_CHECKING:
    from daskinfer.models.registry import ModelRegistry


async def answer(
    batch: InboxBatch,
    stages: Sequence[Stage],
    ctx: StageContext,
    outputs: Sequence[str] | None = None,
    *,
    trace: Any = None,
) -> ResultBatch:
    """Run ``stages`` on every request batch of ``batch``; return the answers to write.

    ``trace`` (a :class:`~daskinfer.tracing.BatchTrace`, current while this runs): the stages and
    model calls record spans."""
    scope = ctx.fork()
    scope.trace = trace
    now = time.time()
    lives = []
    for rb in batch.requests:
        received = min(o.received_at for o in rb.origins)
        lives.append(Live(rb, timings={"queue": max(now - received, 0.0)}))
    lives = await run_stages(stages, lives, scope)
    parts = finish(lives, outputs) + scope.failed + scope.recorded
    ctx.model_seconds += scope.model_seconds
    ctx.model_calls += scope.model_calls
    return ResultBatch(parts, batch.rejected, batch.reads, batch.n_rows)


def _columns(inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    return {"x": np.asarray(inputs)}


async def run_local(
    stages: Sequence[Stage],
    inputs: Mapping[str, Any] | np.ndarray,
    *,
    model: str | None = None,
    models: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    registry: ModelRegistry | None = None,
    errors: str = "raise",
) -> dict[str, np.ndarray]:
    """Run ``stages`` in this process on ``inputs`` (each row one request); see
    :meth:`~daskinfer.dataflow.pipeline.Pipeline.arun`."""
    from daskinfer.models.registry import local_registry

    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    cols = _columns(inputs)
    n = len(next(iter(cols.values())))
    rb = RequestBatch(
        [str(i) for i in range(n)],
        cols,
        None,
        np.zeros(n, dtype=bool),
        None,
        None,
        np.full(n, np.nan),
        np.full(n, np.nan),
        np.zeros(n, dtype=np.int32),
        [Origin(None, True, time.time())],
    )
    ctx = StageContext(registry or local_registry(), default_model=model, allowed_models=models)
    result = await answer(InboxBatch([rb], [], [], n), stages, ctx, outputs)
    out: dict[str, np.ndarray] = {}
    failed: dict[int, tuple[str, str]] = {}
    for part in result.parts:
        if part.target is not None:
            continue
        idx = np.array([int(i) for i in part.batch.ids], dtype=np.int64)
        if part.error is not None:
            failed.update({int(i): part.error for i in idx})
            continue
        for k, v in (part.outputs or {}).items():
            if k not in out:
                out[k] = np.zeros((n, *v.shape[1:]), dtype=v.dtype)
            out[k][idx] = v
    if failed and errors == "raise":
        first = min(failed)
        t, msg = failed[first]
        raise ResultError(
            f"{len(failed)} of {n} rows failed; row {first}: {t}: {msg}", error_type=t, request_id=str(first)
        )
    if errors == "return":
        err = np.full(n, None, dtype=object)
        for i, (t, msg) in failed.items():
            err[i] = f"{t}: {msg}"
        out["error"] = err
    return out
