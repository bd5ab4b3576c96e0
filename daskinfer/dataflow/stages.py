"""The stages a pipeline is composed of; each works on columnar batches.

A stage takes *live parts* (requests still being answered, with their columns) and
returns live parts; requests it cannot answer become error results for those
requests alone (:class:`~daskinfer.dataflow.batch.ResultPart` with an ``error``).
What the last stage leaves is the answer: the columns it produced.

- :class:`MapBatches`: ``fn(columns) -> columns`` (vectorised pre/post-processing).
- :class:`Filter`: ``fn(columns) -> bool per row or per request``; the others are turned away.
- :class:`Infer`: run a model on the columns it takes as inputs; its outputs join the columns.
- :class:`Ensemble`: several models on the same inputs, then ``combine(outputs_list) -> columns``.
- :class:`Route`: split requests between branches (A/B by weight, canary, or by key).
- :class:`Shadow`: run a branch on a copy; its results are recorded on a topic, not returned.
- :class:`ToTopic`: also record the current results on a topic.

Stages hold user code (functions) and model names; they reach the workers over Dask's
own client channel, never through a broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer import settings
from daskinfer.dataflow.batch import RequestBatch, ResultPart
from daskinfer.exceptions import (
    ConfigError,
    DeadlineExceededError,
    InputValidationError,
    ModelError,
    ModelNotAllowedError,
    RemoteModelError,
    RequestError,
    RequestRejected,
    StageError,
)
from daskinfer.wire.codec import wire_dtype

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from daskinfer.models.registry import ModelRegistry
    from daskinfer.models.spec import Model

logger = logging.getLogger(__name__)


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function, for messages."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}.{qual}" if mod and mod != "__main__" else qual


def check_callable(target: Any, what: str) -> None:
    """Raise :class:`ConfigError` unless ``target`` is a callable or a ``"module:function"`` string."""
    if callable(target):
        return
    if isinstance(target, str):
        module, sep, attr = target.partition(":")
        if sep and module and attr:
            return
        raise ConfigError(f"{what}: expected a callable or 'module:function', got {target!r}")
    raise ConfigError(f"{what}: expected a callable or 'module:function', got {type(target).__name__}")


def resolve_callable(target: Any, what: str) -> Callable[..., Any]:
    """A callable, or one named ``"module:function"`` (imported where the stage runs)."""
    check_callable(target, what)
    if callable(target):
        return target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        import importlib

        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{what}: cannot import {target!r}: {e}") from e
        if not callable(obj):
            raise ConfigError(f"{what}: {target!r} is not callable")
        return obj
    raise ConfigError(f"{what}: expected a callable or 'module:function', got {type(target).__name__}")


@dataclass
class Live:
    """Requests still being answered: their batch (columns included) and what the answer is so far."""

    batch: RequestBatch
    result: list[str] | None = None  # names of the columns that answer (None: all columns)
    model: str | None = None
    version: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def replace(self, batch: RequestBatch, **kw: Any) -> Live:
        return Live(
            batch,
            kw.get("result", self.result),
            kw.get("model", self.model),
            kw.get("version", self.version),
            kw.get("timings", self.timings),
        )


_RNG: list[np.random.Generator] = []


def _shared_rng() -> np.random.Generator:
    """One generator per process for route draws (making one per batch costs more than the draws)."""
    if not _RNG:
        _RNG.append(np.random.default_rng())
    return _RNG[0]


class StageContext:
    """What stages need where they run: the models, the thread for user code, and where failures go.

    Parameters
    ----------
    registry : ModelRegistry
        Loaded models (a worker's, or this process's).
    default_model : str, optional
        The model of ``Infer(model=None)`` when a request names none.
    allowed_models : collection of str, optional
        Models a request may name (None: any model loaded here).
    max_batch_size : int
        Most rows in one model call (larger batches are cut).
    executor : Executor, optional
        Where user functions run (None: inline).
    inline_rows : int
        Batches up to this many rows run user functions inline (a thread hop costs more).
    max_bisect_calls : int
        Extra model calls allowed per batch to find the requests at fault.
    seed : int, optional
        Seed of the random draws of :class:`Route`.
    side : callable, optional
        ``side(parts)`` writes results for other topics (a shadow's) apart from the answers, so
        that they never hold the answers up (a deployed partition's writer); None: stages that
        record such results run inline and add them to :attr:`recorded`.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        default_model: str | None = None,
        allowed_models: Sequence[str] | None = None,
        max_batch_size: int = 4096,
        executor: Executor | None = None,
        inline_rows: int = 16,
        max_bisect_calls: int = 32,
        seed: int | None = None,
        install_models: bool = True,
        side: Callable[[list[ResultPart]], None] | None = None,
    ):
        self.registry = registry
        self.side = side
        self.default_model = default_model
        self.allowed_models = None if allowed_models is None else frozenset(allowed_models)
        self.max_batch_size = max_batch_size
        self.executor = executor
        self.inline_rows = inline_rows
        self.max_bisect_calls = max_bisect_calls
        self.install_models = install_models  # load Model specs named by stages here (in-process runs)
        self.rng = np.random.default_rng(seed) if seed is not None else _shared_rng()
        self.failed: list[ResultPart] = []  # requests answered with an error
        self.recorded: list[ResultPart] = []  # results for other topics (shadow, copies)
        self.model_seconds = 0.0
        self.model_calls = 0

    def fork(self) -> StageContext:
        """A context for one batch: the same models and settings, its own failures and records."""
        out = StageContext(
            self.registry,
            default_model=self.default_model,
            max_batch_size=self.max_batch_size,
            executor=self.executor,
            inline_rows=self.inline_rows,
            max_bisect_calls=self.max_bisect_calls,
            install_models=self.install_models,
            side=self.side,
        )
        out.allowed_models = self.allowed_models
        out.rng = self.rng
        return out

    def fail(self, live: Live, requests: np.ndarray | None, exc: BaseException) -> None:
        """Answer ``requests`` of ``live`` (None: all) with ``exc``."""
        batch = live.batch if requests is None else live.batch.take(requests)
        if len(batch):
            self.failed.append(
                ResultPart(batch, None, (type(exc).__name__, str(exc)), live.model, live.version, dict(live.timings))
            )

    async def call_user(self, fn: Callable[..., Any], *args: Any, rows: int) -> Any:
        """Run a user function: inline for small batches, else in the partition's thread."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self.executor is None or rows <= self.inline_rows:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class Stage:
    """A step of a pipeline. Subclasses implement :meth:`apply`."""

    kind = "stage"

    def __init__(self, name: str | None = None):
        self.name = name

    def label(self) -> str:
        return f"{self.kind} {self.name!r}" if self.name else self.kind

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        raise NotImplementedError

    def models(self) -> list[Any]:
        """Models this stage runs (names or :class:`~daskinfer.models.spec.Model` specs)."""
        return []

    def topics(self) -> list[str]:
        """Topics this stage records results on (made when the pipeline is deployed)."""
        return []

    def check(self) -> None:
        """Cheap checks at deploy time (on the deploying client)."""

    def resolve_references(self) -> None:
        """Import what the stage names (``"module:function"``) where it runs, before any traffic;
        raise :class:`~daskinfer.exceptions.ConfigError` naming a reference that does not resolve."""

    def children(self) -> list[Stage]:
        """Stages nested in this one (branches)."""
        return []


def walk(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` and every stage nested in them, depth first."""
    out: list[Stage] = []
    for s in stages:
        out.append(s)
        out += walk(s.children())
    return out


def check_wire_dtype(arr: np.ndarray, what: str) -> None:
    """Raise unless ``arr``'s dtype can travel in a result (``what`` names its maker and the column)."""
    if not wire_dtype(arr.dtype):
        raise TypeError(
            f"{what} has dtype {arr.dtype}: results cannot carry it (numbers, bools, strings, bytes and "
            "datetimes they can: convert it, e.g. with .astype(str))"
        )


def _check_columns(out: Any, rows: int, label: str) -> dict[str, np.ndarray]:
    if not isinstance(out, Mapping):
        raise StageError(
            f"{label} must return a mapping of column name to array, got {type(out).__name__}", stage=label
        )
    cols: dict[str, np.ndarray] = {}
    for k, v in out.items():
        arr = np.asarray(v)
        if arr.ndim == 0 or len(arr) != rows:
            got = "a scalar" if arr.ndim == 0 else f"{len(arr)} rows"
            raise StageError(f"{label} returned column {k!r} with {got} for a batch of {rows} rows", stage=label)
        try:
            check_wire_dtype(arr, f"{label} returned column {k!r}, which")
        except TypeError as e:
            raise StageError(str(e), stage=label) from None
        cols[str(k)] = arr
    if not cols:
        raise StageError(f"{label} returned no columns", stage=label)
    return cols


def _user_error(label: str, fn: Any, e: BaseException) -> StageError:
    if isinstance(e, StageError):
        return e
    return StageError(f"{label} ({callable_name(fn)}) raised {type(e).__name__}: {e}", stage=label)


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
    ):
        self.model = model
        self.strict = strict
        self.inputs = dict(inputs) if inputs else None
        self.outputs = [outputs] if isinstance(outputs, str) else (list(outputs) if outputs else None)
        super().__init__(name or self.model_name)

    @property
    def model_name(self) -> str | None:
        return self.model if (self.model is None or isinstance(self.model, str)) else self.model.name

    def models(self) -> list[Any]:
        return [] if self.model is None else [self.model]

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

    async def _call(
        self, dep: Any, live: Live, feed: dict[str, np.ndarray], ctx: StageContext, budget: list[int]
    ) -> list[Live]:
        batch = live.batch
        rows = batch.n_rows
        finite = batch.deadlines[~np.isnan(batch.deadlines)]
        t0 = time.time()
        deadline = max(float(finite.min()) - t0, 0.0) if len(finite) else None
        try:
            if rows <= ctx.max_batch_size:
                outs = await dep.apredict(feed, deadline=deadline)
            else:
                chunks = []
                for start in range(0, rows, ctx.max_batch_size):
                    chunk = {k: v[start : start + ctx.max_batch_size] for k, v in feed.items()}
                    chunks.append(await dep.apredict(chunk, deadline=deadline))
                outs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
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


class Ensemble(Stage):
    """Several models on the same batch, then ``combine([outputs_of_each]) -> columns``.

    Parameters
    ----------
    models : list of str or Model
        The members; each takes its inputs from the columns as :class:`Infer` does.
    combine : callable or str, optional
        Takes the list of the members' output dicts (in ``models`` order) and returns the
        answer's columns.  Default: the mean of each output over the members.
    """

    kind = "ensemble"

    def __init__(
        self, models: Sequence[str | Model], combine: Callable[..., Any] | str | None = None, *, name: str | None = None
    ):
        if not models:
            raise ConfigError("ensemble needs at least one model")
        self.members = [Infer(m) for m in models]
        self.combine = combine
        super().__init__(name or "+".join(str(m.model_name) for m in self.members))
        self._resolved: Callable[..., Any] | None = None

    def models(self) -> list[Any]:
        return [m.model for m in self.members]

    @staticmethod
    def mean(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.mean([o[k] for o in outputs], axis=0) for k in outputs[0]}

    def resolve_references(self) -> None:
        if self._resolved is None:
            self._resolved = self.mean if self.combine is None else resolve_callable(self.combine, self.label())

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        self.resolve_references()
        out = []
        for live in lives:
            out += await self._run(live, ctx)
        return out

    async def _run(self, live: Live, ctx: StageContext) -> list[Live]:
        """The members run at once, each on the same requests; a request one of them fails is answered
        with the first such failure (in member order), the others are combined."""
        batch = live.batch
        forks = [ctx.fork() for _ in self.members]
        results = await asyncio.gather(*(m.apply([live], f) for m, f in zip(self.members, forks)))
        order = np.argsort(batch.seq, kind="stable")
        sorted_seq = batch.seq[order]

        def where(seq: np.ndarray) -> np.ndarray:  # positions in ``batch`` of requests by their seq
            return order[np.searchsorted(sorted_seq, seq)]

        failed = np.zeros(len(batch), dtype=bool)
        answered = np.ones(len(batch), dtype=bool)
        for res, f in zip(results, forks):
            ctx.model_seconds += f.model_seconds
            ctx.model_calls += f.model_calls
            ctx.recorded += f.recorded
            for part in f.failed:
                at = where(part.batch.seq)
                fresh = ~failed[at]
                if fresh.all():
                    ctx.failed.append(part)
                elif fresh.any():
                    idx = np.flatnonzero(fresh)
                    ctx.failed.append(dataclasses.replace(part, batch=part.batch.take(idx)))
                failed[at] = True
            got = np.zeros(len(batch), dtype=bool)
            for c in res:
                got[where(c.batch.seq)] = True
            answered &= got
        keep = np.flatnonzero(answered & ~failed)
        if not len(keep):
            return []
        per_member = []
        for res in results:
            joined = RequestBatch.concat([c.batch for c in res])
            at = where(joined.seq)
            inverse = np.empty(len(batch), dtype=np.int64)
            inverse[at] = np.arange(len(at))
            picked = joined.take(inverse[keep])
            names = res[0].result or []
            per_member.append({k: picked.columns[k] for k in names})
        base = batch.take(keep)
        rows = base.n_rows
        combine = self._resolved
        assert combine is not None
        try:
            combined = _check_columns(await ctx.call_user(combine, per_member, rows=rows), rows, self.label())
        except Exception as e:
            ctx.fail(live.replace(base), None, _user_error(self.label(), combine, e))
            return []
        timings = results[0][0].timings if results[0] else live.timings
        return [Live(base.with_columns({**base.columns, **combined}), list(combined), self.label(), None, timings)]


class Route(Stage):
    """Split requests between branches: by weight (A/B tests, canaries) or by key.

    Parameters
    ----------
    branches : dict of str to Pipeline, model name or Model
        Each branch's stages (a model alone means ``infer(model)``).
    weights : dict of str to float, optional
        Share of the requests each branch gets (normalised); default: equal shares.
    by : {"random", "key"}
        ``"random"`` draws each request's branch; ``"key"`` hashes its key, so all requests
        of a key go to the same branch.
    """

    kind = "route"

    def __init__(
        self,
        branches: Mapping[str, Any],
        *,
        weights: Mapping[str, float] | None = None,
        by: str = "random",
        name: str | None = None,
    ):
        if not branches:
            raise ConfigError("route needs at least one branch")
        if by not in ("random", "key"):
            raise ConfigError(f"route: by must be 'random' or 'key', got {by!r}")
        self.branches = {str(k): as_stages(v) for k, v in branches.items()}
        w = dict(weights) if weights else {k: 1.0 for k in self.branches}
        unknown = set(w) - set(self.branches)
        if unknown:
            raise ConfigError(
                f"route: weights for unknown branches {sorted(unknown)}; branches: {sorted(self.branches)}"
            )
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ConfigError(f"route: weights must be >= 0 with a positive sum, got {w}")
        total = sum(w.values())
        self.names = list(self.branches)
        self.cumulative = np.cumsum([w.get(k, 0.0) / total for k in self.names])
        self.by = by
        super().__init__(name or "/".join(self.names))

    def models(self) -> list[Any]:
        return [m for stages in self.branches.values() for s in stages for m in s.models()]

    def topics(self) -> list[str]:
        return [t for stages in self.branches.values() for s in stages for t in s.topics()]

    def check(self) -> None:
        for stages in self.branches.values():
            for s in stages:
                s.check()

    def children(self) -> list[Stage]:
        return [s for stages in self.branches.values() for s in stages]

    def _draw(self, batch: RequestBatch, ctx: StageContext) -> np.ndarray:
        n = len(batch)
        if self.by == "key" and batch.keys is not None:
            u = (
                np.array([zlib.crc32(str(k).encode()) if k is not None else 0 for k in batch.keys], dtype=np.float64)
                / 2**32
            )
        else:
            u = ctx.rng.random(n)
        return np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.names) - 1)

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        out = []
        for live in lives:
            branch = self._draw(live.batch, ctx)
            for b, name in enumerate(self.names):
                idx = np.flatnonzero(branch == b)
                if len(idx):
                    out += await run_stages(self.branches[name], [live.replace(live.batch.take(idx))], ctx)
        return out


class Shadow(Stage):
    """Run a branch on a copy of every batch; its results are recorded on ``topic``, not returned.

    The requests go on unchanged; the shadow's errors are recorded, never returned either.  In a
    deployed partition the shadow runs as a task of its own, off the answers' path: at most
    ``max_inflight`` batches of it at once, and a batch that finds them all busy is not shadowed
    (counted in :attr:`dropped`), so a slow shadow never slows the answers.

    Parameters
    ----------
    branch : Pipeline, stage(s), model name or Model
        What runs on the copy.
    topic : str
        Where its results go.
    max_inflight : int, optional
        Shadow batches running at once per partition; config ``daskinfer.pipeline.shadow-inflight``.

    Attributes
    ----------
    running : int
        Shadow batches running now.
    shadowed, dropped : int
        Requests the shadow ran on, and requests it skipped because it was behind.
    """

    kind = "shadow"

    def __init__(self, branch: Any, topic: str, *, max_inflight: int | None = None, name: str | None = None):
        if not topic:
            raise ConfigError("shadow needs a topic to record its results on")
        self.stages = as_stages(branch)
        self.topic = topic
        self.max_inflight = int(settings.get("pipeline.shadow-inflight", max_inflight))  # resolved where it is made
        if self.max_inflight < 1:
            raise ConfigError(f"shadow: max_inflight must be >= 1, got {self.max_inflight}")
        super().__init__(name or topic)
        self._reset()

    def _reset(self) -> None:
        self.running = 0
        self.shadowed = 0
        self.dropped = 0
        self._tasks: set[asyncio.Task] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in ("running", "shadowed", "dropped", "_tasks"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def models(self) -> list[Any]:
        return [m for s in self.stages for m in s.models()]

    def topics(self) -> list[str]:
        return [self.topic] + [t for s in self.stages for t in s.topics()]

    def children(self) -> list[Stage]:
        return list(self.stages)

    def figures(self) -> dict[str, int]:
        """What the partition's status shows of this shadow."""
        return {"running": self.running, "shadowed": self.shadowed, "dropped": self.dropped}

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        copies = [live.replace(live.batch) for live in lives]
        if ctx.side is None:  # in this process: nowhere else to record, run inline
            await self._shadow(copies, ctx.fork(), ctx)
            return lives
        n = sum(len(live.batch) for live in lives)
        if self.running >= self.max_inflight:
            self.dropped += n
            return lives
        self.running += 1
        self.shadowed += n
        task = asyncio.ensure_future(self._shadow(copies, ctx.fork(), None))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return lives

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.running -= 1
        if not task.cancelled() and task.exception() is not None:
            logger.error("shadow %r failed: %r", self.name, task.exception())

    async def _shadow(self, lives: list[Live], shadow_ctx: StageContext, parent: StageContext | None) -> None:
        done = await run_stages(self.stages, lives, shadow_ctx)
        parts = [*finish(done), *shadow_ctx.failed]
        for part in parts:
            part.target = self.topic
        parts += shadow_ctx.recorded
        if parent is not None:
            parent.recorded += parts
            parent.model_seconds += shadow_ctx.model_seconds
        elif shadow_ctx.side is not None:
            shadow_ctx.side(parts)

    def cancel(self) -> None:
        """Stop the shadow batches still running (the partition stops)."""
        for t in list(self._tasks):
            t.cancel()


class ToTopic(Stage):
    """Also record the current results (as result frames) on ``topic``; the requests go on."""

    kind = "to_topic"

    def __init__(self, topic: str, *, name: str | None = None):
        self.topic = topic
        super().__init__(name or topic)

    def topics(self) -> list[str]:
        return [self.topic]

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        for part in finish(lives):
            part.target = self.topic
            ctx.recorded.append(part)
        return lives


def as_stages(branch: Any) -> list[Stage]:
    """A branch given as a pipeline, a list of stages, a stage, a model name or a Model."""
    stages = getattr(branch, "stages", None)
    if stages is not None:
        return list(stages)
    if isinstance(branch, Stage):
        return [branch]
    if isinstance(branch, (list, tuple)) and all(isinstance(s, Stage) for s in branch):
        return list(branch)
    if isinstance(branch, str) or hasattr(branch, "plugin_name"):
        return [Infer(branch)]
    raise ConfigError(f"a branch must be a Pipeline, a stage, a model name or a Model, got {type(branch).__name__}")


async def run_stages(stages: Sequence[Stage], lives: list[Live], ctx: StageContext) -> list[Live]:
    """Run ``stages`` in order on ``lives``; failed requests land in ``ctx.failed``."""
    for stage in stages:
        if not lives:
            break
        lives = await stage.apply(lives, ctx)
    return lives


def finish(lives: list[Live], outputs: Sequence[str] | None = None) -> list[ResultPart]:
    """The answers of the requests that went through every stage."""
    parts = []
    for live in lives:
        cols = live.batch.columns
        names = list(outputs) if outputs else (live.result if live.result is not None else list(cols))
        parts.append(
            ResultPart(
                live.batch, {k: cols[k] for k in names if k in cols}, None, live.model, live.version, live.timings
            )
        )
    return parts
