"""streamz operators: ``smart_batch`` and ``infer`` (local and Dask streams).

>>> from streamz import Stream
>>> import daskinfer
>>> source = Stream()
>>> source.smart_batch(max_batch_size=1024).infer("mlp").flatten().sink(print)  # doctest: +SKIP

On a Dask stream the model runs on the workers that hold it::

    source.smart_batch().scatter().infer("mlp").buffer(8).gather().flatten().sink(...)

Blocks flow through, never one Python object per row: an item is an array with
rows first, or a dict of such arrays.  ``smart_batch`` emits a list of items;
``infer`` runs the list as one model call and emits the list of their outputs.
On a Dask stream an item whose model call fails comes out as an
:class:`InferenceFailure` in its place (the stream goes on).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.client import default_client
from streamz import Stream
from streamz.dask import DaskStream

from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.models.registry import local_registry, registry_for
from daskinfer.models.spec import Model
from daskinfer.tensors import concat, rows_of, split


class Items(list):
    """A chunk of items emitted at once; ``smart_batch`` queues them one by one."""


@Stream.register_api()
class smart_batch(Stream):
    """Group items into batches that grow with the load.

    When fewer than ``max_inflight`` emitted batches are still being taken by the
    downstream, everything queued (up to ``max_batch_size`` rows) is emitted at once
    as a list; while the downstream is busy, items queue up and form the next batch.

    An upstream never waits for the batches downstream: ``update`` returns a future only
    while the queue holds ``max_batch_size * max_inflight`` rows or more (back-pressure),
    so a source keeps reading while batches are in flight.

    Parameters
    ----------
    max_batch_size : int, optional
        Most rows per batch; config ``daskinfer.batching.max-batch-size``.
    max_delay : float or str, optional
        Longest wait for a batch to fill; config ``daskinfer.batching.max-delay`` (0).
    max_inflight : int, optional
        Batches the downstream may hold at once; config ``daskinfer.batching.max-inflight``.

    Examples
    --------
    >>> source = Stream()
    >>> source.smart_batch(max_batch_size=256).sink(print)  # doctest: +SKIP
    """

    def __init__(self, upstream, max_batch_size=None, max_delay=None, max_inflight=None, **kwargs):
        self.policy = BatchPolicy.from_config(max_batch_size, max_delay, max_inflight)
        self._queue: deque[tuple[Any, int, Any, float]] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._timer = None
        self._room: list[asyncio.Future] = []
        self._tasks: set[asyncio.Task] = set()  # referenced until done, so none is collected mid-flight
        kwargs["ensure_io_loop"] = True
        Stream.__init__(self, upstream, **kwargs)

    def _now(self) -> float:
        return time.monotonic()

    def _call_later(self, delay: float, fn) -> Any:
        # the loop that runs us: a partition's nodes run on the worker's asyncio loop, which is not
        # always the loop streamz picked for the node (a timer there would never fire)
        try:
            return asyncio.get_running_loop().call_later(delay, fn)
        except RuntimeError:  # a synchronous local stream: its own IO loop runs the node
            return self.loop.call_later(delay, fn)

    def update(self, x, who=None, metadata=None):
        now = self._now()
        for item in x if isinstance(x, Items) else (x,):
            self._retain_refs(metadata)
            rows = rows_of(item)
            self._queue.append((item, rows, metadata, now))
            self._queued_rows += rows
        self._flush()
        if self._queued_rows >= self.policy.max_batch_size * self.policy.max_inflight:
            fut = asyncio.get_event_loop().create_future()
            self._room.append(fut)
            return fut
        return None

    def _flush(self) -> None:
        while True:
            oldest_wait = self._now() - self._queue[0][3] if self._queue else 0.0
            decision = self.policy.decide([q[1] for q in self._queue], self._inflight, oldest_wait)
            if decision.take == 0:
                if decision.wait is not None and self._timer is None:
                    self._timer = self._call_later(decision.wait, self._on_timer)
                break
            taken = [self._queue.popleft() for _ in range(decision.take)]
            self._queued_rows -= sum(t[1] for t in taken)
            metadata = [m for t in taken for m in (t[2] or [])]
            out = self._emit([t[0] for t in taken], metadata=metadata)
            for t in taken:
                self._release_refs(t[2] or [])
            pending = [r for r in out if asyncio.isfuture(r) or asyncio.iscoroutine(r)]
            if pending:
                self._inflight += 1
                task = asyncio.ensure_future(self._wait_downstream(pending))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._wake_producers()

    async def _wait_downstream(self, pending):
        try:
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._inflight -= 1
            self._flush()

    def _on_timer(self):
        self._timer = None
        self._flush()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._queued_rows

    @property
    def inflight(self) -> int:
        """Batches emitted and not yet taken by the downstream."""
        return self._inflight

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        return not self._queue and self._inflight == 0

    def _wake_producers(self):
        if self._queued_rows < self.policy.max_batch_size * self.policy.max_inflight:
            for fut in self._room:
                if not fut.done():
                    fut.set_result(None)
            self._room.clear()


def _run_local(model: str | Model, x: Any, output: str | None, registry: Any = None) -> Any:
    """Run ``model`` on an item or a list of items in this process (or worker)."""
    if isinstance(model, Model):
        dep = (registry or local_registry()).get_or_install(model)
    else:
        dep = (registry or registry_for()).get(model)
    if isinstance(x, list):
        sizes = [rows_of(i) for i in x]
        outs = split(dep.predict(concat(x)), sizes)
        return [o[output] for o in outs] if output else outs
    out = dep.predict(x)
    return out[output] if output else out


@Stream.register_api()
class infer(Stream):
    """Run a model on each item (a block, or a list of blocks from ``smart_batch``).

    Emits the outputs as a dict of arrays (or the ``output`` array), or a list of
    them for a list input.  On a local stream the model is a :class:`Model` (loaded
    in this process on first use) or the name of one loaded here; on a Dask stream
    (after ``scatter()``) it is the name of a model deployed with :func:`daskinfer.deploy`.

    Parameters
    ----------
    model : str or Model
        The model.
    output : str, optional
        Emit only this output's array.
    registry : ModelRegistry, optional
        Where to find models by name (default: this worker's, else this process's).
    """

    def __init__(self, upstream, model, output=None, registry=None, **kwargs):
        self.model = model
        self.output = output
        self.registry = registry
        Stream.__init__(self, upstream, **kwargs)

    def update(self, x, who=None, metadata=None):
        return self._emit(_run_local(self.model, x, self.output, self.registry), metadata=metadata)


@Stream.register_api()
class run_pipeline(Stream):
    """Run a :class:`~daskinfer.Pipeline`'s stages in this process on each item.

    An item is a block (a dict of columns, or an array as column ``"x"``) or a list of
    blocks from ``smart_batch``; each row is one request.  Emits the output columns (a list
    of them for a list).  Rows that fail raise :class:`~daskinfer.exceptions.ResultError`
    (``errors="raise"``) or get an ``"error"`` column (``errors="return"``).

    Examples
    --------
    >>> source = Stream(asynchronous=True)                                   # doctest: +SKIP
    >>> source.smart_batch().run_pipeline(pipe).flatten().sink(print)        # doctest: +SKIP
    """

    def __init__(self, upstream, pipeline, registry=None, errors="raise", **kwargs):
        self.pipeline = pipeline
        self.registry = registry
        self.errors = errors
        Stream.__init__(self, upstream, **kwargs)

    def update(self, x, who=None, metadata=None):
        return asyncio.ensure_future(self._run(x, metadata))

    async def _run(self, x, metadata):
        self._retain_refs(metadata)
        try:
            items = x if isinstance(x, list) else [x]
            blocks = [i if isinstance(i, dict) else {"x": np.asarray(i)} for i in items]
            sizes = [rows_of(b) for b in blocks]
            out = await self.pipeline.arun(concat(blocks), registry=self.registry, errors=self.errors)
            parts = split(out, sizes)
            await asyncio.gather(*self._emit(parts if isinstance(x, list) else parts[0], metadata=metadata))
        finally:
            self._release_refs(metadata)


@dataclass(frozen=True)
class InferenceFailure:
    """What a Dask stream's ``infer`` emits for an item whose model call failed.

    A failed task would stall ``gather()`` (streamz waits on it forever), so the
    failure travels as a value instead, one per failed item (also inside a batch): filter
    it out, or route it to a dead-letter sink.  It is falsy.

    Attributes
    ----------
    model : str
        The model's name.
    error_type : str
        The exception's type name, e.g. ``"InputValidationError"``.
    error : str
        The exception's message.
    """

    model: str
    error_type: str
    error: str

    def __bool__(self) -> bool:
        return False


def _run_on_worker(model: str, x: Any, output: str | None) -> Any:
    """Outputs for ``x``, with failures as values: a list gets a list of the same length.

    When a list's one model call fails, each item runs alone, so the good items of the
    batch still get their outputs and only the bad ones become :class:`InferenceFailure`.
    """
    try:
        return _run_local(model, x, output)
    except Exception as e:
        if not isinstance(x, list):
            return InferenceFailure(model, type(e).__name__, str(e))
    return [_run_on_worker(model, item, output) for item in x]


@DaskStream.register_api()
class infer(DaskStream):  # type: ignore[no-redef]  # noqa: F811 - the Dask stream's own ``infer``
    """``infer`` on a Dask stream: the model runs on the worker that holds it.

    An item whose model call fails comes out as an :class:`InferenceFailure` in its place,
    so one bad item never stalls the stream.  For a list (a batch from ``smart_batch``) the
    result is a list of the same length: the good items' outputs, and an
    :class:`InferenceFailure` for each bad item, so ``flatten()`` gives one result per item.

    Examples
    --------
    Keep the answers and send the failures elsewhere:

    >>> from daskinfer.dataflow.streams import InferenceFailure
    >>> results = source.smart_batch().scatter().infer("mlp").buffer(8).gather().flatten()  # doctest: +SKIP
    >>> results.filter(lambda r: isinstance(r, InferenceFailure)).sink(print)  # doctest: +SKIP
    >>> answers = results.filter(lambda r: not isinstance(r, InferenceFailure)).sink_to_list()  # doctest: +SKIP
    """

    def __init__(self, upstream, model, output=None, **kwargs):
        self.model = model.name if isinstance(model, Model) else model
        self.output = output
        DaskStream.__init__(self, upstream, **kwargs)

    def update(self, x, who=None, metadata=None):
        client = default_client()
        result = client.submit(_run_on_worker, self.model, x, self.output, pure=False)
        return self._emit(result, metadata=metadata)
