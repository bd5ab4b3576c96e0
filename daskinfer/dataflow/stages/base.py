"""What every stage shares: the :class:`Stage` base, the requests it works on (:class:`Live`), where
it runs (:class:`StageContext`), running a list of stages and turning what is left into answers.

Also the checks stages make of what user code gives them: a function named ``"module:function"``
(:func:`check_callable`, :func:`resolve_callable`) and the columns a stage returns (a mapping of
arrays with one row per input row, of a dtype results can carry).  The stage families live in
their own modules of :mod:`daskinfer.dataflow.stages` and import this one, never the reverse.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.dataflow.batch import RequestBatch, ResultPart
from daskinfer.exceptions import ConfigError, StageError
from daskinfer.importing import import_object
from daskinfer.tracing import stage_span
from daskinfer.wire.codec import wire_dtype

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from daskinfer.models.registry import ModelRegistry


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
        try:
            obj = import_object(module, attr)
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
        self.trace: Any = None  # the batch's spans (daskinfer.tracing.BatchTrace) when it is traced

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


async def run_stages(stages: Sequence[Stage], lives: list[Live], ctx: StageContext) -> list[Live]:
    """Run ``stages`` in order on ``lives``; failed requests land in ``ctx.failed``."""
    for stage in stages:
        if not lives:
            break
        if ctx.trace is None:
            lives = await stage.apply(lives, ctx)
            continue
        with stage_span(stage.kind, stage.label(), sum(live.batch.n_rows for live in lives)):
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
